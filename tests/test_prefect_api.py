"""Prefect REST helpers against a real temporary Prefect server (the session's test harness)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from deltapatch import prefect_api
from deltapatch.errors import DeltapatchError
from tests.conftest import make_project

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def test_send_event_reaches_the_named_server() -> None:
    api = _api()
    event_id = prefect_api.send_event(api, "deltapatch.test.ping", {"prefect.resource.id": "deltapatch.test.x"},
                                      {"path": "/somewhere"})
    body = {"filter": {"event": {"name": ["deltapatch.test.ping"]}, "occurred": {"since": "2000-01-01T00:00:00Z"}}}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # events are stored by a background service
        found = httpx.post(f"{api}/events/filter", json=body, timeout=10).json()["events"]
        if any(e["id"] == event_id for e in found):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"event {event_id} was not stored by the server at {api}")
    stored = next(e for e in found if e["id"] == event_id)
    assert stored["payload"] == {"path": "/somewhere"}


def test_send_event_to_a_dead_server_says_which() -> None:
    with pytest.raises(DeltapatchError, match="could not reach the Prefect API at http://127.0.0.1:9/api"):
        prefect_api.send_event("http://127.0.0.1:9/api", "x.y", {"prefect.resource.id": "x"}, {})


def test_missing_deployment_is_a_clear_error() -> None:
    with pytest.raises(DeltapatchError, match="no deployment 'patch-task/patch-task'.*deltapatch stack up"):
        prefect_api.deployment_id(_api(), "patch-task/patch-task")


def test_arrival_without_a_served_patch_task_fails_before_announcing(tmp_path: Path) -> None:
    from deltapatch.inbox import emit_arrival

    with pytest.raises(DeltapatchError, match="no deployment 'patch-task/patch-task'"):
        emit_arrival(_api(), tmp_path / "cats")


def test_api_url_comes_from_the_environment_and_none_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    params: dict[str, Any] = make_project(tmp_path / "project")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert prefect_api.api_url_for(params) == "http://127.0.0.1:9/api"  # no stack: the environment
    monkeypatch.delenv("PREFECT_API_URL")
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with pytest.raises(DeltapatchError, match="deltapatch stack up"):
            prefect_api.api_url_for(params)
