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

    view = serving_set(params)                     # what `serve` uses
    switch(params, 3, {"shapes": 7}, {}, reason="upgrade")   # deltapatch/registry/base_switch.py
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.errors import RegistryError, TaskNameError
from deltapatch.registry.client import T_BASE_FP, T_REGISTRATION, _client, _wrap_errors, model_versions
from deltapatch.registry.reading import _aliases, _float, _version_info, _warn_once, champions, get_version
from deltapatch.registry.tracking import registry_settings
from deltapatch.task_names import validate_task_name

# base version tags
T_ARCH = "arch"
T_BASE_ACC = "base_acc"
T_RELEASE = "release"                  # JSON {task: version}: the patches served with this base
T_UNAVAILABLE = "release_unavailable"  # JSON {task: reason}: tasks served without a patch on this base
T_PARTIAL = "partial_release"          # the --allow-partial decision, in words
T_DVC_REV = "dvc_rev"                  # git commit whose .dvc file tracks these weights
T_SWITCHED_FROM = "switched_from"
T_REBASED_PREFIX = "rebased/"          # rebased/<task> = "v3 → v7: gate passed (0.91 → 0.93)"


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


def _valid_tasks(mv: Any, tag: str, found: dict[str, Any]) -> dict[str, Any]:
    """`found` (a release tag read from the registry) without the task names that break the naming
    rule: skipped with one warning, like models with such names (reading.valid_registry_task)."""
    out = {}
    for task, value in found.items():
        try:
            out[validate_task_name(str(task))] = value
        except TaskNameError as exc:
            _warn_once(f"{mv.name} v{mv.version} {tag} {task!r}",
                       f"ignoring task {task!r} in tag {tag} of {mv.name} version {mv.version}: {exc}")
    return out


def _to_base(mv: Any, champion: int | None) -> BaseVersion:
    tags = dict(mv.tags or {})
    switched = tags.get(T_SWITCHED_FROM, "")
    release = _json(tags.get(T_RELEASE), {})
    unavailable = _json(tags.get(T_UNAVAILABLE), {})
    return BaseVersion(
        version=int(mv.version), fingerprint=tags.get(T_BASE_FP, ""), arch=tags.get(T_ARCH, ""),
        base_acc=_float(tags.get(T_BASE_ACC)), in_service=int(mv.version) == champion,
        release={t: int(v) for t, v in _valid_tasks(mv, T_RELEASE, release if isinstance(release, dict) else {}).items()},
        unavailable=dict(_valid_tasks(mv, T_UNAVAILABLE, unavailable if isinstance(unavailable, dict) else {})),
        dvc_rev=tags.get(T_DVC_REV, ""),
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
        versions = model_versions(client, base_model_name(params), registry_settings(params).page_size)
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


__all__ = ["BaseVersion", "ServingSet", "SwitchRecord", "base_model_name", "champion_base", "get_base",
           "list_bases", "serving_set"]
