"""Project discovery and `params.yaml` loading.

Every tunable lives in the project's `params.yaml`. Each component owns a small settings
dataclass and builds it with :func:`section`, so adding a component never touches this file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from deltapatch.errors import DeltapatchError

PARAMS_FILE = "params.yaml"
STATE_DIR = ".deltapatch"

T = TypeVar("T")


class ConfigError(DeltapatchError, ValueError):
    """A problem with params.yaml or the project layout, phrased for the user."""


def find_project_root(start: Path | None = None) -> Path:
    """Walk up from `start` (default: cwd or $DELTAPATCH_PROJECT) to the folder holding params.yaml."""
    env = os.environ.get("DELTAPATCH_PROJECT")
    here = Path(env or start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file():
            return folder
    raise ConfigError(
        f"no {PARAMS_FILE} found in {here} or any parent folder; run deltapatch inside a project "
        f"(a folder with {PARAMS_FILE}) or set DELTAPATCH_PROJECT"
    )


def load_params(root: Path | None = None) -> dict[str, Any]:
    """Read params.yaml of the project at `root` (found from cwd when None)."""
    root = root or find_project_root()
    path = root / PARAMS_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc}); fix the file's syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data["_root"] = str(root)
    return data


def project_root(params: dict[str, Any]) -> Path:
    return Path(params.get("_root") or find_project_root())


def state_dir(params: dict[str, Any]) -> Path:
    """The project's private state folder (checkpoints, local stores, PIDs, logs)."""
    path = project_root(params) / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def section(params: dict[str, Any], name: str, cls: type[T]) -> T:
    """Build the settings dataclass `cls` from params[name], rejecting unknown keys by name."""
    raw = params.get(name) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: section '{name}' must be a mapping")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"params.yaml: unknown key(s) {unknown} in section '{name}'; known keys: {sorted(known)}"
        )
    return cls(**raw)


def resolve_path(params: dict[str, Any], value: str | os.PathLike[str]) -> Path:
    """Paths in params.yaml are relative to the project root."""
    path = Path(value)
    return path if path.is_absolute() else project_root(params) / path
