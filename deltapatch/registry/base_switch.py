"""Moving the base in service: the switch (one alias move, see deltapatch/registry/bases.py for why
that is atomic), rollback to the previous base and its patches, and the rebase links on a base version."""

from __future__ import annotations

import json
from typing import Any

from deltapatch.errors import DeltapatchError, FingerprintMismatch, RegistryError
from deltapatch.registry.aliases import promote
from deltapatch.registry.bases import (
    T_PARTIAL,
    T_REBASED_PREFIX,
    T_RELEASE,
    T_SWITCHED_FROM,
    T_UNAVAILABLE,
    SwitchRecord,
    _champion_version,
    base_model_name,
    get_base,
    serving_set,
)
from deltapatch.registry.client import _client, _lock, _now, _wrap_errors
from deltapatch.registry.reading import champions, get_version
from deltapatch.registry.tracking import registry_settings

BASE_LOCK = "base"  # the file lock of every switch (a task cannot be called "base")


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
def repair(params: dict[str, Any]) -> list[str]:
    """Finish the bookkeeping of a switch interrupted after its alias move (serving was right all along):
    every task's own `champion` is moved to the version served with the base in service, and removed
    where the task is unavailable. Returns the tasks fixed (none when nothing was left undone)."""
    settings = registry_settings(params)
    with _lock(params, BASE_LOCK, settings):
        view = serving_set(params)
        if view.base_version is None:
            return []
        own = champions(params)
        fixed = []
        for task, info in sorted(view.tasks.items()):
            if task not in own or own[task]["base_fingerprint"] != view.fingerprint:
                promote(params, task, info["version"], reason="finishing an interrupted base switch")
                fixed.append(task)
        for task in sorted(view.unavailable):
            if task in own and own[task]["base_fingerprint"] != view.fingerprint:
                _client(params).delete_registered_model_alias(settings.model_name(task), settings.champion_alias)
                fixed.append(task)
        return fixed


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


__all__ = ["link_rebased", "repair", "rollback", "set_base_tags", "switch"]
