"""Reading the registry: registered versions as info dicts, the champions, downloading a version's
patch files, model URIs."""

from __future__ import annotations

import math
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.errors import RegistryError
from deltapatch.registry.client import (
    PATCH_ARTIFACT,
    T_BASE_CHECK,
    T_BASE_FP,
    T_BASE_VERSION,
    T_DATA_VERSION,
    T_GATE,
    T_PATCH_ACC,
    T_PATCH_BYTES,
    T_REGISTRATION,
    T_TRAINABLE_PCT,
    _client,
    _wrap_errors,
)
from deltapatch.registry.tracking import RegistrySettings, configure, registry_settings

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    rm = client.get_registered_model(name)
    raw = rm.aliases or {}
    if isinstance(raw, dict):
        return {alias: int(v) for alias, v in raw.items()}
    return {a.alias: int(a.version) for a in raw}


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _version_info(task: str, mv: ModelVersion, aliases: dict[str, int]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    version = int(mv.version)
    return {
        "task": task, "model_name": mv.name, "version": version,
        "aliases": sorted(a for a, v in aliases.items() if v == version),
        "gate": tags.get(T_GATE, "passed" if task == "base" else ""),
        "patch_acc": _float(tags.get(T_PATCH_ACC)),
        "base_fingerprint": tags.get(T_BASE_FP, ""), "base_version": _int(tags.get(T_BASE_VERSION)),
        "data_version": tags.get(T_DATA_VERSION, ""), "patch_bytes": _int(tags.get(T_PATCH_BYTES)),
        "trainable_pct": _float(tags.get(T_TRAINABLE_PCT)), "base_check": tags.get(T_BASE_CHECK, ""),
        "registration": tags.get(T_REGISTRATION, ""),
        "created": datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, UTC).isoformat(timespec="seconds"),
        "run_id": mv.run_id or "", "source": mv.source or "", "description": mv.description or "",
        "tags": tags,
    }


def _task_of(settings: RegistrySettings, name: str) -> str:
    return name[len(settings.model_prefix):]


@_wrap_errors
def list_patches(params: dict[str, Any], task: str | None = None) -> list[dict[str, Any]]:
    """Every registered patch version (optionally of one task), newest version first per task."""
    settings = registry_settings(params)
    client = _client(params)
    if task:
        names = [settings.model_name(task)]
    else:
        names = sorted(rm.name for rm in client.search_registered_models(max_results=1000)
                       if rm.name.startswith(settings.model_prefix) and rm.name != settings.base_model_name)
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            aliases = _aliases(client, name)
        except MlflowException:
            if task:
                raise RegistryError(f"no registered patches for task '{task}' (model {name} does not exist)",
                                    hint="`deltapatch patches list` shows the registered tasks") from None
            continue
        versions = client.search_model_versions(f"name='{name}'")
        for mv in sorted(versions, key=lambda m: -int(m.version)):
            rows.append(_version_info(_task_of(settings, name), mv, aliases))
    return rows


@_wrap_errors
def get_version(params: dict[str, Any], task: str, version: int | str | None = None,
                alias: str | None = None) -> dict[str, Any]:
    """One version's info (`task` 'base' = the base model). Default: the champion (the latest for base)."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.base_model_name if task == "base" else settings.model_name(task)
    try:
        aliases = _aliases(client, name)
    except MlflowException:
        raise RegistryError(f"nothing registered for task '{task}' (no model {name})",
                            hint="`deltapatch patches list` shows the registered tasks") from None
    if version is None and alias is None:
        if task == "base":
            versions = [int(m.version) for m in client.search_model_versions(f"name='{name}'")]
            if not versions:
                raise RegistryError(f"{name} has no versions")
            version = max(versions)
        else:
            alias = settings.champion_alias
    if alias is not None:
        if alias not in aliases:
            raise RegistryError(f"task '{task}' has no version with alias '{alias}' (aliases: {sorted(aliases) or 'none'})",
                                hint=f"`deltapatch patches list --task {task}` shows its versions and aliases")
        version = aliases[alias]
    try:
        mv = client.get_model_version(name, str(int(version)))  # type: ignore[arg-type]
    except (MlflowException, ValueError):
        raise RegistryError(f"task '{task}' has no version {version}",
                            hint=f"`deltapatch patches list --task {task}` shows its versions") from None
    return _version_info(task, mv, aliases)


@_wrap_errors
def champions(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task → info of its champion version, for every task that has one."""
    settings = registry_settings(params)
    client = _client(params)
    out: dict[str, dict[str, Any]] = {}
    for rm in client.search_registered_models(max_results=1000):
        if not rm.name.startswith(settings.model_prefix) or rm.name == settings.base_model_name:
            continue
        aliases = _aliases(client, rm.name)
        if settings.champion_alias in aliases:
            mv = client.get_model_version(rm.name, str(aliases[settings.champion_alias]))
            out[_task_of(settings, rm.name)] = _version_info(_task_of(settings, rm.name), mv, aliases)
    return out


@_wrap_errors
def download_patch(params: dict[str, Any], task: str, version: int | str | None = None, alias: str | None = None,
                   dst: Path | None = None) -> Path:
    """Download a version's patch files; returns the local folder holding patch.safetensors + patch.json."""
    info = get_version(params, task, version=version, alias=alias)
    _check_usable(info)
    configure(params)
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"deltapatch-{task}-v{info['version']}-"))
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"models:/{info['model_name']}/{info['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    folder = local / "artifacts" / PATCH_ARTIFACT
    if not (folder / "patch.json").is_file():
        raise RegistryError(f"{uri}: no patch files in the downloaded model ({folder})")
    return folder


def model_uri(params: dict[str, Any], task: str, version: int | str | None = None, alias: str | None = None) -> str:
    """`models:/<prefix><task>/<version>` or `models:/<prefix><task>@<alias>` (default: @champion)."""
    settings = registry_settings(params)
    name = settings.base_model_name if task == "base" else settings.model_name(task)
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or settings.champion_alias}"


def _check_usable(info: dict[str, Any]) -> None:
    if info["task"] != "base" and info.get("registration") not in ("complete", ""):
        raise RegistryError(
            f"task '{info['task']}' version {info['version']} is not a complete registration "
            f"({T_REGISTRATION}={info['registration']}); use another version"
        )
