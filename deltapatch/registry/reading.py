"""Reading the registry: registered versions as info dicts, the champions, downloading a version's
patch files, model URIs."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.delta.patch import read_patch_meta
from deltapatch.errors import DeltapatchError, RegistryError, TaskNameError
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
    model_versions,
    registered_models,
)
from deltapatch.registry.tracking import RegistrySettings, configure, registry_settings
from deltapatch.task_names import BASE_TASK, validate_task_name

log = logging.getLogger("deltapatch.registry")
_warned: set[str] = set()  # registered model names already warned about (once per process, not per poll)

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


def _warn_once(name: str, message: str) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning(message)


def valid_registry_task(settings: RegistrySettings, name: str) -> str | None:
    """The task of registered model `name` (``<prefix><task>``), or None when it is not a patch model:
    the base model, or a task name that breaks the naming rule (deltapatch.task_names).

    Names read back from the registry are checked again because anything that can write to the
    registry can create a model: ``deltapatch-shapes\\n`` (accepted by the old ``$`` check) or
    ``deltapatch-Bad_Name``. Such a model is SKIPPED, with one warning per process naming it, rather
    than failing the whole read: one bad model must not stop `serve` from following every other
    task's champion, and it could not be served anyway (DeltaNetwork.add_task refuses the name).
    Rename it in MLflow (register its versions under a valid name) to use it."""
    if not name.startswith(settings.model_prefix) or name == settings.base_model_name:
        return None
    task = _task_of(settings, name)
    try:
        return validate_task_name(task)
    except TaskNameError as exc:
        _warn_once(name, f"ignoring registered model {name!r}: its task name {task!r} is invalid ({exc})")
        return None


def _checked_task(task: str) -> str:
    """A task name passed in (CLI, release tags): 'base' or a valid task name, else RegistryError."""
    if task == BASE_TASK:
        return task
    try:
        return validate_task_name(task)
    except TaskNameError as exc:
        raise RegistryError(f"no registered patches can exist for task {task!r}: {exc}") from None


@_wrap_errors
def list_patches(params: dict[str, Any], task: str | None = None) -> list[dict[str, Any]]:
    """Every registered patch version (optionally of one task), newest version first per task."""
    settings = registry_settings(params)
    client = _client(params)
    if task:
        names = [settings.model_name(_checked_task(task))]
    else:
        names = sorted(rm.name for rm in registered_models(client, settings.model_prefix, settings.page_size)
                       if valid_registry_task(settings, rm.name) is not None)
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            aliases = _aliases(client, name)
        except MlflowException:
            if task:
                raise RegistryError(f"no registered patches for task '{task}' (model {name} does not exist)",
                                    hint="`deltapatch patches list` shows the registered tasks") from None
            continue
        versions = model_versions(client, name, settings.page_size)
        for mv in sorted(versions, key=lambda m: -int(m.version)):
            rows.append(_version_info(_task_of(settings, name), mv, aliases))
    return rows


@_wrap_errors
def get_version(params: dict[str, Any], task: str, version: int | str | None = None,
                alias: str | None = None) -> dict[str, Any]:
    """One version's info (`task` 'base' = the base model). Default: the champion (the latest for base)."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.base_model_name if _checked_task(task) == "base" else settings.model_name(task)
    try:
        aliases = _aliases(client, name)
    except MlflowException:
        raise RegistryError(f"nothing registered for task '{task}' (no model {name})",
                            hint="`deltapatch patches list` shows the registered tasks") from None
    if version is None and alias is None:
        if task == "base":
            versions = [int(m.version) for m in model_versions(client, name, settings.page_size)]
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
    """task → info of its champion version, for every task that has one (every page of the registry;
    models with an invalid task name are skipped with a warning: :func:`valid_registry_task`)."""
    settings = registry_settings(params)
    client = _client(params)
    out: dict[str, dict[str, Any]] = {}
    for rm in registered_models(client, settings.model_prefix, settings.page_size):
        task = valid_registry_task(settings, rm.name)
        if task is None:
            continue
        aliases = _aliases(client, rm.name)
        if settings.champion_alias in aliases:
            mv = client.get_model_version(rm.name, str(aliases[settings.champion_alias]))
            out[task] = _version_info(task, mv, aliases)
    return out


@_wrap_errors
def download_patch(params: dict[str, Any], task: str, version: int | str | None = None, alias: str | None = None,
                   dst: Path | None = None) -> Path:
    """Download a version's patch files; returns the local folder holding patch.safetensors + patch.json.

    Refuses (RegistryError naming both) a version whose patch.json names another task than the one
    it is registered as: loaded, it would replace that other task's patch (a Predictor keys patches
    by the task in patch.json)."""
    info = get_version(params, task, version=version, alias=alias)
    _check_usable(info)
    configure(params)
    own = dst is None
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"deltapatch-{task}-v{info['version']}-"))
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"models:/{info['model_name']}/{info['version']}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        folder = local / "artifacts" / PATCH_ARTIFACT
        if not (folder / "patch.json").is_file():
            raise RegistryError(f"{uri}: no patch files in the downloaded model ({folder})")
        check_patch_task(folder, task, f"{info['model_name']} version {info['version']}")
    except BaseException:
        if own:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    return folder


def check_patch_task(patch_dir: Path, task: str, registered_as: str) -> None:
    """RegistryError unless the patch in `patch_dir` is for `task` (the task of its registered model)."""
    try:
        named = read_patch_meta(patch_dir).task
    except DeltapatchError as exc:
        raise RegistryError(f"{registered_as}: unreadable patch metadata ({exc})") from None
    if named != task:
        raise RegistryError(
            f"{registered_as} is registered for task '{task}', but its patch.json names task '{named}'; "
            f"refused (it would replace the patch of '{named}'): register the patch under its own task"
        )


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
