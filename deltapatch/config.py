"""Project discovery and `params.yaml` loading.

Every tunable lives in the project's `params.yaml`. Each component owns a small settings
dataclass and builds it with :func:`section`, so adding a component never touches this file.
"""

from __future__ import annotations

import copy
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


def with_quick(settings: T, section_name: str, options_field: str) -> T:
    """`settings` with its `quick` overrides applied (bench.quick, stream.quick): unknown keys refused,
    the per-method/per-strategy options in `options_field` merged per name rather than replaced."""
    known = {f.name for f in dataclasses.fields(settings)} - {"quick"}  # type: ignore[arg-type]
    quick: dict[str, Any] = dict(settings.quick)  # type: ignore[attr-defined]
    unknown = sorted(set(quick) - known)
    if unknown:
        raise ConfigError(f"params.yaml: unknown key(s) {unknown} in {section_name}.quick; known: {sorted(known)}")
    options = {name: dict(o or {}) for name, o in getattr(settings, options_field).items()}
    for name, extra in (quick.pop(options_field, None) or {}).items():
        options[name] = {**options.get(name, {}), **(extra or {})}
    return dataclasses.replace(settings, **quick, **{options_field: options})  # type: ignore[type-var]


def resolve_path(params: dict[str, Any], value: str | os.PathLike[str]) -> Path:
    """Paths in params.yaml are relative to the project root."""
    path = Path(value)
    return path if path.is_absolute() else project_root(params) / path


def apply_overrides(params: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` assignments (value in YAML, e.g. `train.min_steps=200`,
    `bench.lr_grid=[0.01]`) to a copy of `params`, for one command run (ablations, quick tries).

    Unknown keys are refused later, by the section's settings dataclass, like in params.yaml.
    """
    result = copy.deepcopy(params)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        path = [part for part in key.strip().split(".") if part]
        if not sep or len(path) < 2:
            raise ConfigError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. train.min_steps=200")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from None
        node = result
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {assignment!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    result["_overrides"] = [*params.get("_overrides", []), *assignments]  # reported by the bench
    return result
