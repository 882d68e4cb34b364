"""Base versions and the set that serving reads as ONE unit (docs/registry.md, "Base upgrades").

Every base is a version of ``<prefix>base`` (tags: fingerprint, architecture, base-task accuracy,
the DVC commit of its weights); the alias ``champion`` on it marks the base in service.

Why the switch is atomic although MLflow has no transaction across registered models: what is served
is derived from ONE pointer, the ``champion`` alias of ``<prefix>base``. The base version it points at
carries the tag ``release`` = {task: version}, the patches made for it, written *before* the alias
moves. A reader (:func:`serving_set`) reads the per-task champions, then the base alias, and for each
task takes its own ``champion`` when that version was trained on this base, else the version named in
the release; a task with neither is listed as unavailable, with the reason. So:

- moving the base alias switches base and patches at once; the per-task aliases follow afterwards as
  bookkeeping (a reader in between still gets a consistent set: a per-task champion of the other
  base is ignored and the release is used);
- a patch for another base is never served with this one, and no task disappears without a reason;
- before leaving a base, its release is refreshed with what it serves, so :func:`rollback` restores it
  (a patch promoted by `patch-task` on the base in service is part of it through its own champion).

    view = serving_set(params)                     # what `serve` and `predict` use
    switch(params, 3, {"shapes": 7}, {}, reason="upgrade")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.errors import DeltapatchError, FingerprintMismatch, RegistryError
from deltapatch.registry.aliases import promote
from deltapatch.registry.client import T_BASE_FP, T_REGISTRATION, _client, _lock, _now, _wrap_errors
from deltapatch.registry.reading import _aliases, _float, _version_info, champions, get_version
from deltapatch.registry.tracking import registry_settings

# base version tags
T_ARCH = "arch"
T_BASE_ACC = "base_acc"
T_RELEASE = "release"                  # JSON {task: version}: the patches served with this base
T_UNAVAILABLE = "release_unavailable"  # JSON {task: reason}: tasks served without a patch on this base
T_PARTIAL = "partial_release"          # the --allow-partial decision, in words
T_DVC_REV = "dvc_rev"                  # git commit whose .dvc file tracks these weights
T_SWITCHED_FROM = "switched_from"
T_REBASED_PREFIX = "rebased/"          # rebased/<task> = "v3 → v7: gate passed (0.91 → 0.93)"
BASE_LOCK = "base"                     # the file lock of every switch (a task cannot be called "base")


@dataclass
class BaseVersion:
    """One registered base."""

    version: int
    fingerprint: str
    arch: str
    base_acc: float | None
    in_service: bool
    release: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    dvc_rev: str = ""
    created: str = ""
    switched_from: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ServingSet:
    """What serving serves: one base and, per task, the patch version made for it."""

    base_version: int | None  # None: no base champion yet (a project from before base versions)
    fingerprint: str           # '' when base_version is None: the local base.weights is served
    tasks: dict[str, dict[str, Any]]  # task → version info (registry.get_version's dict)
    unavailable: dict[str, str]       # task → why it is not served


@dataclass
class SwitchRecord:
    action: str  # upgrade | rollback | adopt
    from_version: int | None
    to_version: int
    tasks: dict[str, int]
    unavailable: dict[str, str]
    at: str
    dvc_rev: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(value: str | None, default: Any) -> Any:
    try:
        return json.loads(value) if value else default
    except json.JSONDecodeError:
        return default


def base_model_name(params: dict[str, Any]) -> str:
    return registry_settings(params).base_model_name


def _to_base(mv: Any, champion: int | None) -> BaseVersion:
    tags = dict(mv.tags or {})
    switched = tags.get(T_SWITCHED_FROM, "")
    return BaseVersion(
        version=int(mv.version), fingerprint=tags.get(T_BASE_FP, ""), arch=tags.get(T_ARCH, ""),
        base_acc=_float(tags.get(T_BASE_ACC)), in_service=int(mv.version) == champion,
        release={t: int(v) for t, v in _json(tags.get(T_RELEASE), {}).items()},
        unavailable=dict(_json(tags.get(T_UNAVAILABLE), {})), dvc_rev=tags.get(T_DVC_REV, ""),
        created=_version_info("base", mv, {})["created"],
        switched_from=int(switched) if switched.isdigit() else None, tags=tags,
    )


def _champion_version(client: MlflowClient, params: dict[str, Any]) -> int | None:
    try:
        return _aliases(client, base_model_name(params)).get(registry_settings(params).champion_alias)
    except MlflowException:
        return None  # no base registered yet


# ------------------------------------------------------------------------------------------ reading
@_wrap_errors
def list_bases(params: dict[str, Any]) -> list[BaseVersion]:
    """Every complete base version, newest first."""
    client = _client(params)
    champion = _champion_version(client, params)
    try:
        versions = client.search_model_versions(f"name='{base_model_name(params)}'")
    except MlflowException:
        return []
    rows = [_to_base(mv, champion) for mv in versions if (mv.tags or {}).get(T_REGISTRATION) == "complete"]
    return sorted(rows, key=lambda b: -b.version)


@_wrap_errors
def get_base(params: dict[str, Any], version: int | str | None = None) -> BaseVersion:
    """One base version (default: the one in service)."""
    client = _client(params)
    champion = _champion_version(client, params)
    name = base_model_name(params)
    if version is None:
        if champion is None:
            raise RegistryError(f"no base is in service yet ({name} has no {registry_settings(params).champion_alias})",
                                hint="`deltapatch base list` puts the project's base in service")
        version = champion
    try:
        mv = client.get_model_version(name, str(int(version)))
    except (MlflowException, ValueError):
        raise RegistryError(f"{name} has no version {version}", hint="`deltapatch base list` shows the bases") from None
    return _to_base(mv, champion)


def champion_base(params: dict[str, Any]) -> BaseVersion | None:
    """The base in service, or None when no base has the champion alias yet."""
    try:
        return get_base(params)
    except RegistryError:
        return None


@_wrap_errors
def serving_set(params: dict[str, Any]) -> ServingSet:
    """The base in service and, per task, the patch version served with it (see the module doc)."""
    client = _client(params)
    per_task = champions(params)  # first: a switch moves the base alias before the per-task ones
    base_v = _champion_version(client, params)
    if base_v is None:
        return ServingSet(None, "", per_task, {})
    base = _to_base(client.get_model_version(base_model_name(params), str(base_v)), base_v)
    tasks: dict[str, dict[str, Any]] = {}
    unavailable: dict[str, str] = {}
    for task in sorted(set(per_task) | set(base.release) | set(base.unavailable)):
        info = per_task.get(task)
        if info is not None and info["base_fingerprint"] == base.fingerprint:
            tasks[task] = info
        elif task in base.release:
            tasks[task] = get_version(params, task, version=base.release[task])
        else:
            unavailable[task] = base.unavailable.get(task) or (
                f"no patch for base v{base_v}: its champion v{info['version'] if info else '?'} was trained on "
                f"base v{info['base_version'] if info else '?'}; rebase it (`deltapatch base upgrade`) or retrain it")
    return ServingSet(base_v, base.fingerprint, tasks, unavailable)


# ------------------------------------------------------------------------------------------ writing
def set_base_tags(params: dict[str, Any], version: int, tags: dict[str, str]) -> None:
    client = _client(params)
    for key, value in tags.items():
        client.set_model_version_tag(base_model_name(params), str(version), key, value[:5000])


@_wrap_errors
def switch(params: dict[str, Any], to_version: int, tasks: dict[str, int], unavailable: dict[str, str], *,
           reason: str, action: str = "upgrade", note: str = "") -> SwitchRecord:
    """Put base `to_version` in service with exactly `tasks` (task → version trained on it); the tasks
    in `unavailable` are listed as not served, with that reason. One alias move is the switch (module
    doc); the per-task champions follow afterwards."""
    settings = registry_settings(params)
    client = _client(params)
    name = base_model_name(params)
    target = get_base(params, to_version)
    for task, version in tasks.items():  # refuse before anything moves
        info = get_version(params, task, version=version)
        if info["base_fingerprint"] != target.fingerprint or info["gate"] != "passed":
            raise FingerprintMismatch(f"{task} v{version} cannot be served with base v{to_version} "
                                      f"(gate {info['gate'] or '?'}, base {info['base_fingerprint'][:19]}…)")
    at = _now()
    with _lock(params, BASE_LOCK, settings):
        current = _champion_version(client, params)
        moving = current is not None and current != target.version
        if moving:
            leaving = serving_set(params)  # what the outgoing base serves now: `rollback` restores it
            set_base_tags(params, int(current), {  # type: ignore[arg-type]  # moving → not None
                T_RELEASE: json.dumps({t: int(i["version"]) for t, i in leaving.tasks.items()}, sort_keys=True),
                T_UNAVAILABLE: json.dumps(leaving.unavailable, sort_keys=True), "left_service_at": at})
        tags = {T_RELEASE: json.dumps(tasks, sort_keys=True), T_UNAVAILABLE: json.dumps(unavailable, sort_keys=True),
                "switched_at": at, "switch_reason": reason}
        if note:
            tags[T_PARTIAL] = note
        if moving:
            tags[T_SWITCHED_FROM] = str(current)
        set_base_tags(params, target.version, tags)
        client.set_registered_model_alias(name, settings.champion_alias, str(target.version))  # THE switch
        event = {"action": action, "at": at, "from_version": current, "to_version": target.version, "reason": reason}
        client.set_registered_model_tag(name, "last_alias_change", json.dumps(event))
    _follow(params, tasks, unavailable, f"base {action} to {name} v{target.version}")
    return SwitchRecord(action, current, target.version, dict(tasks), dict(unavailable), at)


def _follow(params: dict[str, Any], tasks: dict[str, int], unavailable: dict[str, str], reason: str) -> None:
    """Bookkeeping after the switch: each task's own `champion` alias names its served version, and a
    task left unavailable has none (a later `patch-task` gate must not load a patch of the old base)."""
    settings = registry_settings(params)
    client = _client(params)
    current = champions(params)
    for task, version in sorted(tasks.items()):
        if task not in current or int(current[task]["version"]) != int(version):
            promote(params, task, version, reason=reason)
    for task in sorted(unavailable):
        if task in current:
            client.delete_registered_model_alias(settings.model_name(task), settings.champion_alias)


@_wrap_errors
def rollback(params: dict[str, Any], to: int | None = None, reason: str = "") -> SwitchRecord:
    """Back to the base the one in service replaced (or `to`), with the patches it served then."""
    current = get_base(params)
    target_version = to if to is not None else current.switched_from
    if target_version is None:
        raise RegistryError(f"base v{current.version} replaced no other base; nothing to roll back to",
                            hint="`deltapatch base list` shows the bases; `deltapatch base rollback --to N`")
    target = get_base(params, target_version)
    if target.version == current.version:
        raise RegistryError(f"base v{current.version} is already in service")
    tasks, unavailable = {}, dict(target.unavailable)
    for task, version in target.release.items():
        try:
            info = get_version(params, task, version=version)
        except DeltapatchError as exc:
            unavailable[task] = f"v{version} of its release is gone ({exc})"
            continue
        if info["gate"] == "passed" and info["base_fingerprint"] == target.fingerprint:
            tasks[task] = version
        else:
            unavailable[task] = f"v{version} of its release is not usable (gate {info['gate']})"
    return switch(params, target.version, tasks, unavailable, reason=reason or f"rollback from v{current.version}",
                  action="rollback")


def link_rebased(params: dict[str, Any], base_version: int, task: str, text: str) -> None:
    """Tag ``rebased/<task>`` on the base version: the rebased patch version and its gate, in words."""
    set_base_tags(params, base_version, {f"{T_REBASED_PREFIX}{task}": text})


__all__ = ["BaseVersion", "ServingSet", "SwitchRecord", "base_model_name", "champion_base", "get_base",
           "link_rebased", "list_bases", "rollback", "serving_set", "set_base_tags", "switch"]
