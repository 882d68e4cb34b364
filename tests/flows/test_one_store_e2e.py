"""One registry in every mode, on a real local stack: a patch registered by `deltapatch run` with no
stack is listed and served once the stack is up, rolled back through the stack's `rollback-patch`
deployment, and that rollback is what the commands see after `stack down`. On the way, a killed
worker is brought back by `stack up` alone, the other processes keeping their PIDs."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.flows.conftest import new_project, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]


def _served_version(url: str, task: str, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    seen: Any = None
    while time.monotonic() < deadline:
        try:
            seen = httpx.get(f"{url}/tasks", timeout=5).json()
            if seen.get(task, {}).get("version") == version:
                return
        except httpx.HTTPError as exc:
            seen = exc
        time.sleep(1.0)
    raise AssertionError(f"the serving app did not serve {task} v{version}: {seen}")


def test_registered_without_the_stack_served_and_rolled_back_through_it(base_project: dict[str, Any], tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltapatch import stack
    from deltapatch.cli import app
    from deltapatch.registry import registry
    from deltapatch.registry.tracking import resolve_tracking_uri

    params = new_project(base_project, tmp_path / "project", {
        "stack": {"prefect_port": free_port(), "mlflow_port": free_port(), "serve_app": True,
                  "watch_stable_seconds": 1.0, "startup_timeout": 300},
        "registry": {"serve_port": free_port(), "poll_seconds": 1.0},
    })
    root = Path(params["_root"])
    monkeypatch.setenv("DELTAPATCH_PROJECT", str(root))
    for seed in (0, 1):  # two versions, so there is something to roll back to
        result = CliRunner().invoke(app, ["run", str(write_task(tmp_path / f"src{seed}", "shapes", seed=seed)),
                                          "--task", "shapes", "--no-prefect"])
        assert result.exit_code == 0, result.output
    assert resolve_tracking_uri(params).startswith("sqlite:///")
    assert registry.champions(params)["shapes"]["version"] == 2

    try:
        up = stack.up(params)
        urls = up["urls"]
        assert resolve_tracking_uri(params) == urls["mlflow_url"], "with the stack up, commands use its server"
        rows = registry.list_patches(params, "shapes")
        assert [(r["version"], r["aliases"]) for r in rows] == [(2, ["champion"]), (1, [])]
        _served_version(urls["serve_url"], "shapes", 2)

        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: urls["prefect_api_url"]}):
            run = run_deployment("rollback-patch/rollback-patch", parameters={"task_name": "shapes", "reason": "e2e"},
                                 timeout=240, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), run.state
        _served_version(urls["serve_url"], "shapes", 1)

        state = stack.read_state(params)
        pids = {name: entry["pid"] for name, entry in state["processes"].items()}
        worker = state["processes"]["worker"]
        os.killpg(int(worker["pgid"]), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while stack.is_running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not stack.is_running(worker)
        said: list[str] = []
        repaired = stack.up(params, on_progress=said.append)
        assert repaired["started"] == ["worker"] and "worker" not in repaired["kept"], said
        after = {name: p["pid"] for name, p in repaired["processes"].items()}
        assert after["worker"] != pids["worker"]
        assert {n: p for n, p in after.items() if n != "worker"} == {n: p for n, p in pids.items() if n != "worker"}
        assert any("restarted worker" in line for line in said) and any("kept running" in line for line in said)
        assert all(p["running"] for p in repaired["processes"].values()), repaired
    finally:
        stack.down(params)

    assert resolve_tracking_uri(params).startswith("sqlite:///")
    champion = registry.champions(params)["shapes"]
    assert champion["version"] == 1 and champion["tags"]["rollback_reason"] == "e2e"
    with sqlite3.connect(root / ".deltapatch" / "mlflow.db") as con:
        uris = [row[0] for row in con.execute("SELECT artifact_uri FROM runs UNION ALL SELECT storage_location "
                                              "FROM model_versions")]
    assert uris and all(u.startswith("mlflow-artifacts:/") for u in uris), uris
