"""Registry fixtures: two real trained patches of the 'shapes' task (session, ~25 s), and fresh
projects whose MLflow registry is a real sqlite store in the test's temp folder (no mocks)."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deltapatch.config import load_params

TASK = "shapes"


@dataclass
class Trained:
    data: Any          # TaskData of the task
    results: list[Any]  # PatchResult of epochs=1 and epochs=2 (different weights)


@pytest.fixture(scope="session")
def trained(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from deltapatch.data.sources import builtin_task
    from deltapatch.patching import open_session, train_patch

    out = tmp_path_factory.mktemp("trained-patches")
    data = builtin_task(base_project, TASK, per_class=12)
    session = open_session(base_project)
    results = [
        train_patch(base_project, data, out_dir=out / f"e{epochs}", epochs=epochs, progress=False, session=session,
                    data_version=f"test-data-v{epochs}")
        for epochs in (1, 2)
    ]
    return Trained(data, results)


def new_project(base_project: dict[str, Any], folder: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A project folder sharing the session's base weights; its registry is `.deltapatch/mlflow.db`."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    source = Path(base_project["_root"])
    params_yaml = yaml.safe_load((source / "params.yaml").read_text())
    for key, value in (overrides or {}).items():
        params_yaml.setdefault(key, {}).update(value)
    (folder / "params.yaml").write_text(yaml.safe_dump(params_yaml, sort_keys=False))
    shutil.copytree(source / "models", folder / "models", dirs_exist_ok=True)
    return copy.deepcopy(load_params(folder))


@pytest.fixture
def reg_project(base_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fresh project; no MLFLOW_TRACKING_URI, so the registry is its embedded sqlite store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DELTAPATCH_PROJECT", str(tmp_path / "proj"))
    return new_project(base_project, tmp_path / "proj", {"registry": {"retries": 2, "retry_delay_s": 0.1}})


def register(params: dict[str, Any], result: Any, passed: bool = True, data: Any = None) -> int:
    """Log a run for `result` and register it (the flow's sequence)."""
    from deltapatch.registry.registry import log_patch_run, register_patch

    gate = {"passed": passed, "patch_acc": result.metrics["patch_acc"], "min_patch_accuracy": 0.0}
    run_id = log_patch_run(params, result, data=data, gate=gate)
    return register_patch(params, run_id, result, gate, data_version=result.meta.data_version)


def direct_predictions(base_project: dict[str, Any], patch_dir: Path | None, images: Any) -> list[dict[str, Any]]:
    """Reference predictions without MLflow: the local base plus the patch files."""
    from deltapatch.models.base import load_base
    from deltapatch.registry.runtime import Predictor

    predictor = Predictor(load_base(base_project))
    if patch_dir is None:
        return predictor.predict(images, "base")
    meta = predictor.add_patch(patch_dir).meta
    return predictor.predict(images, meta.task)
