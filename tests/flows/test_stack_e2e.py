"""End to end on a real local stack (Prefect server, MLflow server, gpu worker, served deployments,
inbox watcher): arrivals → event trigger → patch-task runs → training queued through the gpu pool →
registered and promoted patches; `stack down` leaves no process behind."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.flows.conftest import new_project, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]


@pytest.fixture
def running_stack(base_project: dict[str, Any], tmp_path: Path):
    from deltapatch import stack

    params = new_project(base_project, tmp_path / "project", {
        "stack": {"prefect_port": free_port(), "mlflow_port": free_port(), "serve_app": False,
                  "watch_stable_seconds": 1.0, "startup_timeout": 300},
    })
    try:
        stack.up(params)
        yield params
    finally:
        state = stack.read_state(params) or {}
        entries = list(state.get("processes", {}).values())
        said: list[str] = []
        stack.down(params, on_progress=said.append)
        left = [e["cmd"] for e in entries if stack.is_running(e)]
        assert not left, f"stack down left processes running: {left}; it said {said}"


def _runs(api: str, deployment: str) -> list[dict[str, Any]]:
    from deltapatch import prefect_api

    return prefect_api.flow_runs(api, prefect_api.deployment_id(api, deployment))


@pytest.mark.usefixtures("prefect_harness")
def test_two_arrivals_trigger_runs_queued_through_the_gpu_pool(running_stack: dict[str, Any], tmp_path: Path) -> None:
    """`prefect_harness` is active on purpose: this process then holds Prefect settings for another
    server (as in a full test session), and the arrivals must still reach the project's stack."""
    from deltapatch import stack
    from deltapatch.demo import wait_for_runs
    from deltapatch.inbox import inbox_dir, submit

    params = running_stack
    api = stack.client_env(params)["PREFECT_API_URL"]

    # Two arrivals at once: one through `submit` (emits the event itself), one dropped into the
    # inbox by hand (the watcher emits the event once the folder is stable).
    submitted = submit(params, write_task(tmp_path / "src", "shapes"), "shapes")
    dropped = inbox_dir(params) / "glyphs"
    shutil.copytree(write_task(tmp_path / "src", "glyphs"), tmp_path / "staged-glyphs")
    (tmp_path / "staged-glyphs").rename(dropped)  # same file system: appears complete at once
    runs = wait_for_runs(api, [submitted["path"], str(dropped)], timeout=600, say=lambda m: None)
    states = {Path(p).name: r["state"]["type"] for p, r in runs.items()}
    assert states == {"shapes": "COMPLETED", "glyphs": "COMPLETED"}, states

    from deltapatch.registry import registry

    champions = registry.champions(params)
    assert {"shapes", "glyphs"} <= set(champions)

    # Training ran on the gpu pool, one run at a time (pool concurrency 1).
    train = [r for r in _runs(api, "train-patch/gpu") if r["state"]["type"] == "COMPLETED"]
    assert len(train) == 2
    spans = sorted((r["start_time"], r["end_time"]) for r in train)
    assert spans[0][1] <= spans[1][0], f"training runs overlapped: {spans}"

    # Each patch-task run was created by the arrival trigger (an automation), not by hand.
    for run in runs.values():
        assert run.get("created_by") and run["created_by"].get("type") == "AUTOMATION", run.get("created_by")
    info = stack.status(params)
    assert all(p["healthy"] for p in info["processes"].values()), info
