"""The `champion` alias: promote a gate-passed version, roll back to the previous one; serialised
per task with a file lock, each change recorded as tags."""

from __future__ import annotations

import json
from typing import Any

from deltapatch.errors import RegistryError
from deltapatch.registry.client import _client, _lock, _now, _wrap_errors
from deltapatch.registry.reading import _aliases, _check_usable, _int, get_version, list_patches
from deltapatch.registry.tracking import registry_settings


def _check_promotable(info: dict[str, Any]) -> None:
    _check_usable(info)
    if info["gate"] != "passed":
        raise RegistryError(
            f"task '{info['task']}' version {info['version']} failed its gate (gate={info['gate'] or 'unknown'}); "
            f"only gate-passed versions can be champion"
        )


@_wrap_errors
def promote(params: dict[str, Any], task: str, version: int | str, reason: str = "") -> dict[str, Any]:
    """Point `champion` at `version` (gate-passed, complete). Serialised per task with a file lock.
    Returns {task, from_version, to_version, at, reason}."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.model_name(task)
    with _lock(params, task, settings):
        info = get_version(params, task, version=version)
        _check_promotable(info)
        previous = _aliases(client, name).get(settings.champion_alias)
        at = _now()
        client.set_registered_model_alias(name, settings.champion_alias, str(info["version"]))
        v = str(info["version"])
        client.set_model_version_tag(name, v, "promoted_at", at)
        client.set_model_version_tag(name, v, "promoted_from", str(previous or ""))
        client.set_model_version_tag(name, v, "promotion_reason", reason or "")
        event = {"action": "promote", "at": at, "from_version": previous, "to_version": info["version"], "reason": reason}
        client.set_registered_model_tag(name, "last_alias_change", json.dumps(event))
        return {"task": task, **{k: event[k] for k in ("from_version", "to_version", "at", "reason")}}


@_wrap_errors
def rollback(params: dict[str, Any], task: str, to: int | str | None = None, reason: str = "") -> tuple[int, int]:
    """Move `champion` to the previous gate-passed version (or `to`); records when, from which
    version and why as tags. Returns (from_version, to_version)."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.model_name(task)
    with _lock(params, task, settings):
        rows = list_patches(params, task)
        current = next((r["version"] for r in rows if settings.champion_alias in r["aliases"]), None)
        if current is None:
            raise RegistryError(f"task '{task}' has no {settings.champion_alias}; nothing to roll back "
                                f"(use `deltapatch patches list --task {task}`)")
        by_version = {r["version"]: r for r in rows}
        if to is None:
            candidates = [r for r in rows if r["version"] < current and r["gate"] == "passed"
                          and r.get("registration") in ("complete", "")]
            if not candidates:
                raise RegistryError(f"task '{task}' has no gate-passed version older than champion v{current} "
                                    f"to roll back to")
            target = max(candidates, key=lambda r: r["version"])
        else:
            target_version = _int(to)
            if target_version is None or target_version not in by_version:
                known = sorted(by_version)
                raise RegistryError(f"task '{task}' has no version {to} (versions: {known}); rollback refused")
            target = by_version[target_version]
            _check_promotable(target)
            if target_version == current:
                raise RegistryError(f"version {current} of '{task}' is already {settings.champion_alias}")
        at = _now()
        to_version = int(target["version"])
        client.set_registered_model_alias(name, settings.champion_alias, str(to_version))
        client.set_model_version_tag(name, str(to_version), "rolled_back_at", at)
        client.set_model_version_tag(name, str(to_version), "rolled_back_from", str(current))
        client.set_model_version_tag(name, str(to_version), "rollback_reason", reason or "")
        client.set_model_version_tag(name, str(current), "demoted_at", at)
        client.set_model_version_tag(name, str(current), "demoted_reason", reason or "")
        event = {"action": "rollback", "at": at, "from_version": current, "to_version": to_version, "reason": reason}
        client.set_registered_model_tag(name, "last_alias_change", json.dumps(event))
        return int(current), to_version
