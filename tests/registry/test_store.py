"""One registry store per project: no machine paths in its metadata, older split projects refused by
name and merged explicitly (`deltapatch registry migrate`), and `patches list` readable at 80 columns."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deltapatch.errors import RegistryError
from deltapatch.registry import store
from tests.registry.conftest import TASK, Trained, new_project, register

URI_QUERIES = ("SELECT artifact_location FROM experiments", "SELECT artifact_uri FROM runs",
               "SELECT artifact_location FROM logged_models", "SELECT storage_location FROM model_versions")


def _uris(db: Path) -> list[str]:
    with sqlite3.connect(db) as con:
        return [row[0] for query in URI_QUERIES for row in con.execute(query)]


def _reset_caches() -> None:
    """A new process's view: the registry remembers per process which stores it checked."""
    from deltapatch.registry import tracking

    tracking._configured.clear()
    tracking._single_store_checked.clear()


def test_registry_metadata_has_no_path_of_this_machine(reg_project: dict[str, Any], trained: Trained) -> None:
    from deltapatch.registry import registry as R

    params = reg_project
    version = register(params, trained.results[0])
    R.promote(params, TASK, version)
    db = Path(params["_root"]) / ".deltapatch" / "mlflow.db"
    uris = _uris(db)
    assert uris and all(u.startswith("mlflow-artifacts:/") for u in uris), uris
    assert not any(params["_root"] in u for u in uris)
    # the files are where the stack's server (--artifacts-destination .deltapatch/mlartifacts) serves them
    folder = R.download_patch(params, TASK)
    assert (folder / "patch.safetensors").read_bytes() == (trained.results[0].patch_dir / "patch.safetensors").read_bytes()
    assert list((db.parent / "mlartifacts").rglob("patch.safetensors"))


def _as_old_stack_store(project: dict[str, Any], target: Path) -> None:
    """Move `project`'s store to `target` in the layout the stack's server used to write:
    stack/mlflow/mlflow.db (mlflow-artifacts: URIs) + stack/mlflow/artifacts/."""
    state = Path(project["_root"]) / ".deltapatch"
    (target / store.LEGACY_STACK_DB).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(state / "mlflow.db", target / store.LEGACY_STACK_DB)
    shutil.move(state / "mlartifacts", target / store.LEGACY_STACK_ARTIFACTS)


def _with_file_paths(state: Path) -> None:
    """Rewrite a store's locations the way older in-process commands wrote them: file:///…/mlartifacts/X."""
    root = (state / "mlartifacts").resolve().as_uri()
    with sqlite3.connect(state / "mlflow.db") as con:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location"), ("model_versions", "storage_location")):
            con.execute(f"UPDATE {table} SET {column} = replace({column}, 'mlflow-artifacts:', ?)", (root,))


def test_two_stores_are_refused_by_name_then_merged_by_migrate(base_project: dict[str, Any], trained: Trained,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch import stack
    from deltapatch.registry import registry as R
    from deltapatch.registry.migrate import migrate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = trained.results
    # the old stack store: shapes v1 (champion) and v2, registered through what is now another project
    old = new_project(base_project, tmp_path / "old")
    R.promote(old, TASK, register(old, first))
    register(old, second)
    # the project's own in-process store (older layout: file: paths): shapes v1 = `second`, champion
    project = new_project(base_project, tmp_path / "project")
    R.promote(project, TASK, register(project, second))
    state = Path(project["_root"]) / ".deltapatch"
    _with_file_paths(state)
    _as_old_stack_store(old, state)
    _reset_caches()

    for attempt in (lambda: R.list_patches(project), lambda: stack.up(project)):
        with pytest.raises(RegistryError) as refused:
            attempt()
        message = str(refused.value)
        assert str(state / "mlflow.db") in message and str(state / store.LEGACY_STACK_DB) in message
        assert "deltapatch registry migrate" in message and "two registry stores" in message
    assert stack.read_state(project) is None, "stack up refused before starting anything"

    report = migrate(state)
    assert report.backup is not None and (report.backup / "mlflow.db").is_file()
    assert not (state / store.LEGACY_STACK_DB).exists() and (report.backup / "stack-store" / "mlflow.db").is_file()
    _reset_caches()
    rows = {r["version"]: r for r in R.list_patches(project, TASK)}
    assert sorted(rows) == [1, 2, 3], "the main store's v1 plus the old store's v1, v2 (renumbered 2, 3)"
    assert rows[2]["tags"]["migrated_from"].endswith("v1") and rows[3]["tags"]["migrated_from"].endswith("v2")
    # both stores had a champion: the more recent move (the main store's) wins, and the report says so
    assert rows[1]["aliases"] == ["champion"]
    assert any("champion" in line and "kept the main store's v1" in line for line in report.actions), report.actions
    # one base (same fingerprint) in both stores: not duplicated; the copied patches refer to it
    assert len(R.list_patches(project)) == 3
    assert {r["base_version"] for r in rows.values()} == {R.find_base_version(project, first.meta.base_fingerprint)}
    # the copied versions' files came along, and every location is a proxied URI now
    copied = R.download_patch(project, TASK, version=3)
    assert (copied / "patch.safetensors").read_bytes() == (second.patch_dir / "patch.safetensors").read_bytes()
    assert all(u.startswith("mlflow-artifacts:/") for u in _uris(state / "mlflow.db"))
    assert store.legacy_problem(state) is None
    assert R.rollback(project, TASK, to=2, reason="after migration") == (1, 2)


def test_only_the_old_stack_store_is_adopted(base_project: dict[str, Any], trained: Trained, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """After `make demo` + `stack down`, the patches were in the stack's store only: they stay visible."""
    from deltapatch.registry import registry as R
    from deltapatch.registry.migrate import migrate

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    old = new_project(base_project, tmp_path / "old")
    R.promote(old, TASK, register(old, trained.results[0]))
    _reset_caches()
    project = new_project(base_project, tmp_path / "project")
    state = Path(project["_root"]) / ".deltapatch"
    _as_old_stack_store(old, state)
    with pytest.raises(RegistryError, match="still in the old stack store"):
        R.list_patches(project)
    migrate(state)
    _reset_caches()
    assert R.champions(project)[TASK]["version"] == 1
    assert R.download_patch(project, TASK).joinpath("patch.json").is_file()


def test_patches_list_fits_80_columns(reg_project: dict[str, Any], trained: Trained) -> None:
    from deltapatch.registry import registry as R

    params = reg_project
    R.promote(params, TASK, register(params, trained.results[0]))
    register(params, trained.results[1])
    env = {**os.environ, "COLUMNS": "80", "DELTAPATCH_PROJECT": params["_root"]}
    env.pop("MLFLOW_LOGGING_LEVEL", None)  # as in a user's shell: only the CLI's own default quiets MLflow
    command = [str(Path(sys.executable).with_name("deltapatch")), "patches", "list"]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = (out.stdout + out.stderr).splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    fingerprint = trained.results[0].meta.base_fingerprint.removeprefix("sha256:")
    assert fingerprint[:12] in out.stdout and fingerprint[:13] not in out.stdout
    assert "INFO" not in out.stdout + out.stderr, "MLflow/alembic INFO logging stays out of the output"
    full = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=300)
    rows = json.loads(full.stdout)
    assert {r["base_fingerprint"] for r in rows} == {trained.results[0].meta.base_fingerprint}
    assert all(r["data_version"] and "tags" in r for r in rows)
