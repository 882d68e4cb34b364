"""Fixtures of the orchestration tests: tiny ingested tasks and a real Prefect test server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import make_project

TINY = {"train": {"epochs": 1, "batch_size": 32}, "gate": {"min_patch_accuracy": 0.0},
        "demo": {"images_per_class": 20}}  # demo.images_per_class also sizes the builtin base eval set


def write_task(folder: Path, name: str, per_class: int = 12, seed: int = 0) -> Path:
    """An embedded task as an ImageFolder (<folder>/<name>/<class>/<image>.png)."""
    from deltapatch.data.builtin import write_imagefolder

    return write_imagefolder(name, folder, 32, seed, per_class)


def new_project(base_project: dict[str, Any], folder: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A project in `folder` sharing the session's base weights, with a git + DVC repo."""
    import shutil

    from deltapatch.data.versioning import ensure_project_repo

    merged: dict[str, Any] = {k: dict(v) for k, v in TINY.items()}
    for key, value in (overrides or {}).items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    params = make_project(folder, merged)
    shutil.copytree(Path(base_project["_root"]) / "models", folder / "models", dirs_exist_ok=True)
    ensure_project_repo(folder, params)
    return params
