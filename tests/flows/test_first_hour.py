"""A first hour without surprises, under a real Prefect API: a missing base stops `run` before any
data is written; errors a retry cannot fix are not retried, an MLflow outage is; arrivals keep the
submitted name and leave the inbox once their run has ended."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, make_project
from tests.flows.conftest import TINY, new_project, write_task
from tests.flows.test_patch_flow import _artifact

pytestmark = pytest.mark.usefixtures("prefect_harness", "isolated_env")


def _count_calls(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> Counter[str]:
    """Count the calls of `module.<name>` (passed through to the real function). Counted here, in the
    process that runs the task, not read back from the Prefect API: Prefect 3 records task runs from
    their events, and a client whose events worker lost its server never records them (seen in CI:
    "Task not found" for the whole 30 s)."""
    calls: Counter[str] = Counter()
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_run_with_a_missing_user_base_stops_before_anything_is_written(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltapatch.cli import app
    from deltapatch.inbox import inbox_dir

    params = make_project(tmp_path / "project", {**TINY, "base": {"weights": "models/mine.safetensors",
                                                                  "eval_set": "data/base-eval"}})
    root = Path(params["_root"])
    src = write_task(tmp_path / "src", "shapes")
    monkeypatch.setenv("DELTAPATCH_PROJECT", str(root))
    result = CliRunner().invoke(app, ["run", str(src)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "models/mine.safetensors not found" in result.output and "stopped before ingesting" in result.output
    assert lines[-1].startswith("→") and "base.weights" in lines[-1], "the last line says what to do"
    assert not (root / "data").exists() and not (root / ".dvc").exists(), "nothing ingested, no DVC version"

    # the flow too (an arrival started by the trigger): it fails before ingesting, the dataset stays put
    from flows.patch_task import patch_task_flow

    dropped = inbox_dir(params) / "shapes"
    os.replace(src, dropped)
    state = patch_task_flow(path=str(dropped), project=str(root), train_on="inline", return_state=True)
    assert state.is_failed() and "mine.safetensors" in state.message
    assert not (root / "data").exists() and dropped.is_dir()


def test_config_error_is_not_retried_and_an_mlflow_outage_is(base_project: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect import flow

    from deltapatch import pipeline
    from deltapatch.config import ConfigError
    from deltapatch.pipeline import ingest_step
    from flows.patch_task import promote_task, train_task

    trainings = _count_calls(monkeypatch, pipeline, "train_step")
    promotions = _count_calls(monkeypatch, pipeline, "promote_step")

    params = new_project(base_project, tmp_path / "project", {"registry": {"retries": 1, "retry_delay_s": 0.1},
                                                              "faults": {"outage_window_s": 4}})
    root = Path(params["_root"])
    ingested = ingest_step(params, write_task(tmp_path / "src", "shapes"), "shapes")
    (root / params["base"]["weights"]).unlink()  # the base vanished: training raises ConfigError

    states: list[Any] = []  # the task's final state (returned, a failed state would fail the flow run)

    @flow
    def train_once() -> None:
        states.append(train_task.with_options(retry_delay_seconds=0)(
            str(root), "shapes", ingested.task_dir, ingested.data_version, ingested.manifest_sha256, 1,
            return_state=True))

    train_once()
    state = states.pop()
    assert state.is_failed()
    with pytest.raises(ConfigError, match="base weights"):
        state.result()
    assert trainings["train_step"] == 1, "a configuration error is not retried (train_task has retries=2)"

    # a real outage: the registry is an MLflow URL whose port nothing listens on
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")

    @flow
    def promote_once() -> None:
        states.append(promote_task.with_options(retry_delay_seconds=0)(str(root), "shapes", "1", return_state=True))

    promote_once()
    state = states.pop()
    assert state.is_failed() and "unreachable" in state.message
    # ridden out inside the step with back-off over faults.outage_window_s (issue 16), then reported
    assert "s of retries; faults.outage_window_s = 4" in state.message
    assert promotions["promote_step"] == 1, "the step rides the outage out itself; Prefect does not rerun it"


def test_an_exact_duplicate_is_refused_says_so_and_leaves_the_inbox(base_project: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from deltapatch.data.ingest import ingest
    from deltapatch.inbox import inbox_dir, submit
    from flows.patch_task import patch_task_flow

    params = new_project(base_project, tmp_path / "project")
    root = Path(params["_root"])
    ingest(write_task(tmp_path / "a", "shapes"), params, task="shapes")
    again = write_task(tmp_path / "b", "shapes")  # the same content, submitted as 'copy'
    copy = again.rename(again.with_name("copy"))
    arrival = submit(params, copy, announce=False)
    assert arrival["task"] == "copy"
    state = patch_task_flow(path=arrival["path"], project=str(root), train_on="inline", return_state=True)
    assert state.is_failed() and "exact duplicate" in state.message
    report = _artifact("copy", state)
    assert "exact duplicate" in report and "'shapes'" in report
    assert list(inbox_dir(params).iterdir()) == [], "moved out of the inbox"
    assert list((root / "data" / "quarantine").glob("*copy*/copy"))
    assert copy.is_dir(), "the user's own folder is untouched"


@pytest.mark.e2e
def test_same_folder_name_twice_gives_two_data_versions_of_that_task(base_project: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    from deltapatch.config import state_dir
    from deltapatch.data.versioning import list_versions
    from deltapatch.inbox import EMITTED_FILE, inbox_dir, submit
    from deltapatch.registry import registry
    from flows.patch_task import patch_task_flow

    params = new_project(base_project, tmp_path / "project")
    root = Path(params["_root"])
    first = submit(params, write_task(tmp_path / "monday", "shapes", seed=0), announce=False)
    second = submit(params, write_task(tmp_path / "tuesday", "shapes", seed=1), announce=False)
    assert Path(first["path"]).name == Path(second["path"]).name == "shapes" and first["path"] != second["path"]
    assert first["task"] == second["task"] == "shapes"
    for arrival in (first, second):
        state = patch_task_flow(path=arrival["path"], project=str(root), train_on="inline", return_state=True)
        assert state.is_completed(), state.message
        assert state.result()["task"] == "shapes" and state.result()["status"] == "promoted"
        assert not Path(arrival["path"]).exists(), "a promoted arrival leaves the inbox"
    assert len(list_versions(params, "shapes")) == 2
    assert [r["version"] for r in registry.list_patches(params, "shapes")] == [2, 1]
    assert list(inbox_dir(params).iterdir()) == [], "no per-arrival folder left behind"
    assert json.loads((state_dir(params) / EMITTED_FILE).read_text()) == {}
