"""deltapatch.faults: the settings' guards, the back-off, and riding out a server outage — the last one
against a real MLflow server that comes up while a registry call is already failing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deltapatch.config import ConfigError
from deltapatch.errors import RegistryError, RegistryUnreachable
from deltapatch.faults import FaultSettings, backoff_delays, is_outage, prefect_client_retries, ride_out
from tests.conftest import free_port, kill_process_group, make_project, start_mlflow_server


def test_settings_refuse_a_window_that_would_crash_live_runs() -> None:
    with pytest.raises(ConfigError, match="minimum"):
        FaultSettings(heartbeat_seconds=10)
    with pytest.raises(ConfigError, match="must exceed"):
        FaultSettings(heartbeat_seconds=30, zombie_after_seconds=30)
    FaultSettings(heartbeat_seconds=30, zombie_after_seconds=31)


def test_backoff_covers_the_outage_window() -> None:
    delays = list(backoff_delays(120))
    assert delays[:4] == [2, 4, 8, 8] and max(delays) == 8 and sum(delays) >= 120 > sum(delays[:-1])
    assert list(backoff_delays(0)) == []
    assert prefect_client_retries(120) == 6  # Prefect's client waits 2 + 4 + … + 64 = 126 s ≥ 120 s
    assert prefect_client_retries(10) == 5  # never fewer than Prefect's default


def test_ride_out_retries_outages_only(tmp_path: Path) -> None:
    params = make_project(tmp_path, {"faults": {"outage_window_s": 30}})
    calls: list[int] = []
    said: list[str] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError("connection refused")
        return "ok"

    assert ride_out(flaky, params, "flaky", say=said.append) == "ok"
    assert len(calls) == 2 and "retrying in 2 s" in said[0]

    def refused() -> None:
        calls.append(1)
        raise RegistryError("version 3 failed its gate")

    calls.clear()
    with pytest.raises(RegistryError, match="failed its gate"):
        ride_out(refused, params, "refused")
    assert len(calls) == 1, "a refusal is not an outage: not retried"

    def down() -> None:
        raise RegistryUnreachable("MLflow at http://127.0.0.1:9 is unreachable")

    with pytest.raises(RegistryUnreachable, match="still failing after .*outage_window_s = 1"):
        ride_out(down, params, "down", window_s=1)
    assert is_outage(RegistryUnreachable("x")) and not is_outage(RegistryError("x")) and not is_outage(ValueError())


@pytest.mark.usefixtures("isolated_env")
def test_registry_call_rides_out_an_mlflow_server_that_comes_back(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is down when the call starts (as during a restart) and comes up ~20 s later."""
    from deltapatch.registry import registry

    port = free_port()
    params = make_project(tmp_path / "project", {"registry": {"retries": 1}, "faults": {"outage_window_s": 90}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    server = start_mlflow_server(tmp_path, port)
    said: list[str] = []
    try:
        started = time.monotonic()
        assert ride_out(lambda: registry.champions(params), params, "reading the champions", say=said.append) == {}
        print(f"MLflow came back: the call succeeded after {time.monotonic() - started:.1f} s, {len(said)} retries")
        assert said and all("retrying" in s for s in said), "the first calls met no server"
        with pytest.raises(RegistryError) as refused:  # the server answers: a refusal fails at once
            ride_out(lambda: registry.promote(params, "no-such-task", 1), params, "promoting")
        assert not isinstance(refused.value, RegistryUnreachable)
    finally:
        kill_process_group(server)
