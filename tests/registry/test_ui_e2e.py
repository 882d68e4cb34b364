"""End to end: a real `mlflow server`, patches registered over HTTP, the registered-model page
loaded in headless Chromium; it must list the task's versions and the `champion` alias.

The screenshot is kept as a CI artifact: $DELTAPATCH_ARTIFACTS (default test-artifacts/)/mlflow-ui-<task>.png.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, free_port, kill_process_group, start_mlflow_server, wait_for_mlflow
from tests.registry.conftest import TASK, Trained, register

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--virtual-time-budget=20000", "--window-size=1400,2200"]


@pytest.fixture
def chromium() -> str:
    """Checked BEFORE the server starts: skip only outside CI; under CI a missing browser fails."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: install it (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Any:
    port = free_port()
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    process = start_mlflow_server(folder, port)
    try:
        yield wait_for_mlflow(process, folder, port)
    finally:
        try:
            kill_process_group(process, signal.SIGTERM, wait_s=20)
        except subprocess.TimeoutExpired:
            kill_process_group(process)


def _chromium(args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_mlflow_ui_lists_versions_and_champion(reg_project: dict[str, Any], trained: Trained, tmp_path: Path,
                                               chromium: str, mlflow_server: str) -> None:
    from deltapatch.registry import registry as R
    from deltapatch.registry.tracking import resolve_tracking_uri, ui_url

    params = reg_project
    server = mlflow_server
    # the running local stack's server is found through its state file (no env var needed)
    stack = Path(params["_root"]) / ".deltapatch" / "stack"
    stack.mkdir(parents=True)
    (stack / "stack.json").write_text(json.dumps({"mlflow_url": server, "pids": {}}))
    assert resolve_tracking_uri(params) == server and ui_url(params) == server

    assert register(params, trained.results[0], data=trained.data) == 1
    v2 = register(params, trained.results[1])
    R.promote(params, TASK, v2, reason="e2e")
    assert R.get_version(params, TASK)["version"] == v2

    page = f"{server}/#/models/deltapatch-{TASK}"
    artifacts = Path(os.environ.get("DELTAPATCH_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / f"mlflow-ui-{TASK}.png"
    screenshot.unlink(missing_ok=True)
    shot = _chromium([f"--screenshot={screenshot}", page], tmp_path / "chrome-1")
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = _chromium(["--dump-dom", page], tmp_path / "chrome-2").stdout
    assert f"deltapatch-{TASK}" in dom
    assert "Version 1" in dom and "Version 2" in dom, dom[-3000:]
    assert "champion" in dom
