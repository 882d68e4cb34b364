"""Issue 16 on a real local stack with two workers on the gpu pool (the stack's, and a second `prefect
worker` with its own PREFECT_HOME standing in for another machine): the worker that is training an
arrival is killed together with its training process. The training run is marked Crashed by the
stack's zombie automation within the heartbeat window, the parent starts attempt 2, which the other
worker runs, resuming from the epoch checkpoint, and the arrival ends promoted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from deltapatch import prefect_api, stack
from deltapatch.demo import run_results, wait_for_runs
from deltapatch.faults import checkpoint_dir
from deltapatch.inbox import submit
from deltapatch.registry import registry
from tests.conftest import free_port
from tests.flows.conftest import new_project, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]

ZOMBIE_AFTER_S = 45  # faults.zombie_after_seconds for this test (heartbeats every 30 s, Prefect's minimum)


def _training_runs(api: str) -> list[dict[str, Any]]:
    return prefect_api.flow_runs(api, prefect_api.deployment_id(api, "train-patch/gpu"))


def _process_of_run(run_id: str) -> tuple[int, int] | None:
    """(pid, parent pid) of the process executing flow run `run_id` (the process worker starts it with
    PREFECT__FLOW_RUN_ID in its environment; its parent is the worker)."""
    marker = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                return int(entry.name), int(stat.rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    return None


def _wait(what: str, check: Any, timeout: float, poll: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _project(base_project: dict[str, Any], folder: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A project on its own stack ports, with enough epochs that a fault lands mid-training."""
    return new_project(base_project, folder, {
        "stack": {"prefect_port": free_port(), "mlflow_port": free_port(), "serve_app": False,
                  "watch_stable_seconds": 1.0, "startup_timeout": 300},
        "train": {"epochs": 40, "min_steps": 0, "batch_size": 16},
        **(overrides or {}),
    })


def _training_with_a_checkpoint(api: str, params: dict[str, Any]) -> dict[str, Any]:
    """The running training run of `shapes`, once its epoch-1 checkpoint exists (a fault after it can resume)."""
    checkpoints = checkpoint_dir(params)

    def found() -> dict[str, Any] | None:
        running = [r for r in _training_runs(api) if r["state_type"] == "RUNNING"]
        return running[0] if running and any(checkpoints.glob("shapes-*.pt")) else None

    return _wait("a running training with its epoch-1 checkpoint", found, 600)


def test_a_killed_training_worker_is_survived_on_the_other_worker(base_project: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    params = _project(base_project, tmp_path / "project",
                      {"faults": {"zombie_after_seconds": ZOMBIE_AFTER_S, "poll_seconds": 1.0}})
    root = Path(params["_root"])
    second: subprocess.Popen[bytes] | None = None
    try:
        stack.up(params)
        api = stack.client_env(params)["PREFECT_API_URL"]
        env = {**stack.process_env(params), **stack.client_env(params), "PREFECT_HOME": str(tmp_path / "second-home")}
        log = (tmp_path / "second-worker.log").open("ab")
        second = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", stack.stack_settings(params).gpu_pool,
             "--type", "process", "--name", "second-machine"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        arrival = submit(params, write_task(tmp_path / "src", "shapes", per_class=30), "shapes")
        run = _training_with_a_checkpoint(api, params)
        pids = _wait("the training process of the run", lambda: _process_of_run(run["id"]), 30)
        for pid in pids:  # the training process and the worker that started it: the machine is gone
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        def crashed() -> bool:
            return any(r["id"] == run["id"] and r["state_type"] == "CRASHED" for r in _training_runs(api))

        _wait("the killed run to be marked Crashed", crashed, ZOMBIE_AFTER_S + 60)
        to_crashed = time.monotonic() - killed
        runs = wait_for_runs(api, [arrival["path"]], timeout=600, say=lambda _m: None)
        done = time.monotonic() - killed
        result = run_results(api, runs)[0]
    finally:
        if second is not None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(30)
        state = stack.read_state(params) or {}
        entries = list(state.get("processes", {}).values())
        stack.down(params)
        assert not [e["cmd"] for e in entries if stack.is_running(e)], "stack down left processes running"

    print(f"kill → Crashed {to_crashed:.1f} s; kill → arrival promoted {done:.1f} s; attempts: "
          f"{[(a['run_name'], a['state']) for a in result.get('training_attempts', [])]}")
    assert to_crashed <= ZOMBIE_AFTER_S + 60
    assert result.get("status") == "promoted", result
    assert result["resumed_from_epoch"] >= 1, "attempt 2 resumed from the checkpoint: its first epoch was > 1"
    attempts = result["training_attempts"]
    assert [a["state"] for a in attempts][:1] == ["Crashed"] and len(attempts) >= 2, attempts
    assert registry.champions(params)["shapes"]["version"] == 1


def test_a_prefect_server_restart_during_training_is_ridden_out(base_project: dict[str, Any], tmp_path: Path) -> None:
    """Issue 16: the Prefect server dies while an arrival trains and is back 30 s later (`stack up`
    restarts it alone, same port and database); the same arrival completes and trained once."""
    params = _project(base_project, tmp_path / "project")
    try:
        stack.up(params)
        api = stack.client_env(params)["PREFECT_API_URL"]
        arrival = submit(params, write_task(tmp_path / "src", "shapes", per_class=30), "shapes")
        _training_with_a_checkpoint(api, params)
        server = (stack.read_state(params) or {})["processes"]["prefect"]
        os.killpg(int(server["pgid"]), signal.SIGKILL)  # the server and its children, as a crash
        time.sleep(30)
        stack.up(params)  # restarts the dead server alone (same port, same database)
        runs = wait_for_runs(api, [arrival["path"]], timeout=600, say=lambda _m: None)
        result = run_results(api, runs)[0]
        training = _training_runs(api)
    finally:
        stack.down(params)
    assert result.get("status") == "promoted", result
    assert [(r["name"], r["state_type"]) for r in training] == [("train-shapes", "COMPLETED")], \
        "one training run, completed through the outage: trained once"
    assert registry.champions(params)["shapes"]["version"] == 1
