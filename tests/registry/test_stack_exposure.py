"""`deltapatch stack up` never starts the stack's servers beyond loopback without the stack's
credentials, nor the serving app there without a token, also when it repairs a partly running stack
(deltapatch.stack.lifecycle.repair). Nothing is started: the stack
host is a TEST-NET address (RFC 5737) that no port can be bound on, so a missing check fails on the
port probe instead of spawning anything."""

from __future__ import annotations

import os
from typing import Any

import pytest

FOREIGN = "192.0.2.10"


def _project(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch, credentials: bool = True) -> dict[str, Any]:
    """The project on FOREIGN; with the stack's credentials (so that the serving token is what is
    checked), put in this process's environment through monkeypatch, which takes them out again."""
    from deltapatch import stack
    from deltapatch.stack.auth import load_credentials

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    project.setdefault("stack", {}).update({"host": FOREIGN, "serve_app": True, "database": "sqlite"})
    if credentials:
        for key, value in load_credentials(stack.credentials(project)).client_env().items():
            monkeypatch.setenv(key, value)  # what `up` sets for its own calls; undone after the test
    return project


def test_repair_refuses_to_restart_a_server_beyond_loopback_without_credentials(
        project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.config import ConfigError
    from deltapatch.stack import repair

    params = _project(project, monkeypatch, credentials=False)
    state = _partly_running(params)
    state["processes"].pop("prefect")
    state["processes"]["watcher"] = _partly_running(params)["processes"]["prefect"]  # the servers are down
    said: list[str] = []
    with pytest.raises(ConfigError, match=f"refusing to start the stack on {FOREIGN} without credentials"):
        repair(params, state, said.append)
    assert said == [], "nothing was started or restarted"


def _partly_running(params: dict[str, Any]) -> dict[str, Any]:
    """A stack state whose `prefect` entry is a live process (this test's own), the others down."""
    from deltapatch.stack.processes import _proc_start_time
    from deltapatch.stack.settings import _write_state, stack_dir

    stack_dir(params).mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "pgid": os.getpgid(0), "start_time": _proc_start_time(os.getpid()), "cmd": [],
          "log": os.devnull}
    state = {"processes": {"prefect": me}}
    _write_state(params, state)
    return state


def test_repair_refuses_to_restart_serve_beyond_loopback_without_a_token(project: dict[str, Any],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.config import ConfigError
    from deltapatch.stack import StackError, repair, up

    params = _project(project, monkeypatch)
    state = _partly_running(params)
    said: list[str] = []
    with pytest.raises(ConfigError, match=f"refusing to serve on {FOREIGN} without a token"):
        repair(params, state, said.append)
    with pytest.raises(ConfigError, match="refusing to serve"):
        up(params, said.append)  # a partly running stack: `up` repairs it
    assert said == [], "nothing was started or restarted"

    monkeypatch.setenv("DELTAPATCH_SERVE_TOKEN", "s3cret-token")  # with a token the check passes ...
    with pytest.raises(StackError, match="in use"):  # ... and the (unbindable) port probe refuses next
        repair(params, state, said.append)
