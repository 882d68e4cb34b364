"""Faults survived (issue 16), against a real Prefect API (prefect_test_harness):

- the stack's zombie automation is created as specified, found intact, and repaired when disabled;
- the training deployment carries heartbeats (job variables) and the tag the automation watches;
- a training run that nobody picks up is cancelled after faults.queue_timeout_s (no arrival hangs);
- a training run marked Crashed (what the automation does when its worker died) is followed by a new
  run, attempt 2, until faults.train_attempts is spent.

No worker runs here: the tests play the server-side events (a run going Running, then Crashed) with
Prefect's own client, so they take seconds. Resuming from the checkpoint is tested in
test_patch_flow.py (a crash in the training, retried in place).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deltapatch import pool
from deltapatch.automations import (
    HEARTBEAT_TAG,
    ZOMBIE_AUTOMATION,
    ensure_zombie_automation,
    zombie_automation_state,
)
from deltapatch.faults import fault_settings
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_harness", "isolated_env")

TRAIN = "train-patch/gpu"
FAST = {"poll_seconds": 0.2, "outage_window_s": 10, "queue_timeout_s": 60, "train_attempts": 2}


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value()).rstrip("/")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project and its training deployment on a pool without workers (nothing ever runs the runs)."""
    from flows.deployments import deploy_training, ensure_pool

    params = make_project(tmp_path_factory.mktemp("faults-project"), {"faults": FAST})
    ensure_pool("faults-test", 1)
    deploy_training(params["_root"], "faults-test")
    return params


def _find_run(name: str, timeout: float = 30.0) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
            if found:
                return found[0]
            time.sleep(0.2)
    raise AssertionError(f"no flow run {name} within {timeout} s")


def _set_state(run_id: Any, state: Any) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, state, force=True)


def _read_run(run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def test_zombie_automation_is_created_found_intact_and_repaired(tmp_path: Path) -> None:
    settings = fault_settings(make_project(tmp_path, {"faults": {"zombie_after_seconds": 75}}))
    api = _api()
    first = ensure_zombie_automation(api, settings)
    assert first.action in ("created", "ok", "updated")
    assert ensure_zombie_automation(api, settings).action == "ok", "the server's copy reads back as specified"
    assert zombie_automation_state(api, settings)[0]

    found = httpx.post(f"{api}/automations/filter", json={"automations": {"name": {"any_": [ZOMBIE_AUTOMATION]}}})
    (automation,) = [a for a in found.json() if a["name"] == ZOMBIE_AUTOMATION]
    trigger, (action,) = automation["trigger"], automation["actions"]
    assert trigger["posture"] == "Proactive" and trigger["within"] == 75
    assert sorted(trigger["after"]) == ["prefect.flow-run.Running", "prefect.flow-run.heartbeat"]
    assert trigger["for_each"] == ["prefect.resource.id"]
    assert trigger["match_related"]["prefect.resource.id"] == f"prefect.tag.{HEARTBEAT_TAG}"
    assert action["type"] == "change-flow-run-state" and action["state"] == "CRASHED"

    httpx.patch(f"{api}/automations/{automation['id']}", json={"enabled": False}).raise_for_status()
    healthy, detail = zombie_automation_state(api, settings)
    assert not healthy and "disabled" in detail
    assert ensure_zombie_automation(api, settings).action == "updated"
    assert zombie_automation_state(api, settings)[0]
    other = fault_settings(make_project(tmp_path / "other", {"faults": {"zombie_after_seconds": 120}}))
    assert not zombie_automation_state(api, other)[0], "another window in params.yaml is reported"


def test_training_deployment_sends_heartbeats(deployed: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(TRAIN)
    assert HEARTBEAT_TAG in deployment.tags
    env = deployment.job_variables["env"]
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert env["PREFECT_CLIENT_MAX_RETRIES"] == "5"  # the 10 s window needs 3 (2 + 4 + 8 s); never under 5
    assert pool.pool_available(deployed, TRAIN) is False, "no worker online: the flow trains in-process"


def test_training_run_nobody_picks_up_is_cancelled_not_waited_for(deployed: dict[str, Any]) -> None:
    params = {**deployed, "faults": {**FAST, "queue_timeout_s": 1.5}}
    said: list[str] = []
    started = time.monotonic()
    with pytest.raises(pool.TrainingRunError, match="waited .* for a worker"):
        pool.train_on_pool(params, TRAIN, {"task_name": "queued", "task_dir": "/nowhere"}, say=said.append)
    assert time.monotonic() - started < 20
    assert _read_run(_find_run("train-queued").id).state.is_cancelled()


def test_crashed_training_run_is_followed_by_a_new_attempt(deployed: dict[str, Any]) -> None:
    from prefect.states import Crashed, Running

    outcome: dict[str, Any] = {}
    said: list[str] = []

    def parent() -> None:
        try:
            pool.train_on_pool(deployed, TRAIN, {"task_name": "zombie", "task_dir": "/nowhere"}, say=said.append)
        except Exception as exc:  # noqa: BLE001 — inspected below
            outcome["error"] = exc

    thread = threading.Thread(target=parent, daemon=True)
    thread.start()
    for name, attempt in (("train-zombie", 1), ("train-zombie-attempt-2", 2)):
        run = _find_run(name)
        assert run.parameters["attempt"] == attempt
        _set_state(run.id, Running())
        time.sleep(0.5)  # the parent sees it running
        _set_state(run.id, Crashed(message="no heartbeat for 90 s (test)"))
    thread.join(30)
    assert not thread.is_alive(), "the parent still waits on a crashed run"
    error = outcome.get("error")
    assert isinstance(error, pool.TrainingRunError), error
    assert "failed 2 time(s)" in str(error) and "Crashed" in str(error)
    assert any("starting attempt 2" in s for s in said), said
