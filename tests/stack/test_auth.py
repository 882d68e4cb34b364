"""The stack's credentials (deltapatch.stack.auth): generated once into a private file, refused when
others can read it, required before any server starts beyond loopback, rotated only while the stack
is down. The servers' behaviour with them is in tests/flows/test_stack_e2e.py (a stack on 0.0.0.0)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from deltapatch import stack
from deltapatch.config import ConfigError
from deltapatch.stack import auth
from deltapatch.stack.processes import _proc_start_time
from deltapatch.stack.settings import _write_state
from tests.conftest import make_project


@pytest.fixture
def params(tmp_path: Path) -> dict[str, Any]:
    return make_project(tmp_path / "project", {"stack": {"host": "0.0.0.0"}})


def test_credentials_are_generated_once_private_and_rotated_only_when_down(params: dict[str, Any]) -> None:
    path = stack.credentials(params)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = auth.load_credentials(path)
    assert first.prefect_auth_string.startswith("deltapatch:") and len(first.mlflow_password) >= 32
    assert len({first.prefect_auth_string, first.mlflow_password, first.mlflow_secret_key}) == 3
    assert stack.credentials(params) == path and auth.load_credentials(path) == first  # kept

    (path.parent / auth.AUTH_DB_FILE).write_bytes(b"old user store")
    # A stack process recorded as running (this test's own process, same start time): no rotation.
    me = {"pid": os.getpid(), "pgid": os.getpid(), "start_time": _proc_start_time(os.getpid()), "cmd": [], "log": ""}
    _write_state(params, {"processes": {"prefect": me}})
    with pytest.raises(stack.StackError, match="the stack is running"):
        stack.credentials(params, rotate=True)
    assert auth.load_credentials(path) == first
    _write_state(params, {"processes": {}})
    stack.credentials(params, rotate=True)
    rotated = auth.load_credentials(path)
    assert rotated.mlflow_password != first.mlflow_password
    assert rotated.prefect_auth_string != first.prefect_auth_string
    assert not (path.parent / auth.AUTH_DB_FILE).exists(), "MLflow recreates its admin with the new password"


def test_a_readable_or_foreign_credentials_file_is_refused_with_the_fix(params: dict[str, Any], tmp_path: Path) -> None:
    path = stack.credentials(params)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users") as readable:
        auth.load_credentials(path)
    assert f"chmod 600 {path}" in str(readable.value.hint)

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"token": "x"}))
    foreign.chmod(0o600)
    with pytest.raises(ConfigError, match="not a deltapatch credentials file"):
        auth.load_credentials(foreign)
    with pytest.raises(ConfigError, match="no such credentials file"):
        auth.load_credentials(tmp_path / "missing.json")


def test_stack_up_beyond_loopback_without_credentials_starts_nothing(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="refusing to start the stack on 0.0.0.0 without credentials") as refused:
        stack.up(params)
    assert "deltapatch stack credentials" in str(refused.value.hint)
    assert not (stack.read_state(params) or {}).get("processes"), "nothing was started"
    assert auth.require_credentials({**params, "stack": {**params["stack"], "host": "127.0.0.1"}}, "127.0.0.1") is None


def test_every_stack_process_and_another_machines_worker_log_in(params: dict[str, Any], tmp_path: Path) -> None:
    from deltapatch.worker import worker_env

    path = stack.credentials(params)
    found = auth.load_credentials(path)
    env = stack.process_env(params)
    assert env["PREFECT_API_AUTH_STRING"] == found.prefect_auth_string
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (found.mlflow_username,
                                                                                 found.mlflow_password)
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env and "MLFLOW_AUTH_ADMIN_PASSWORD" not in env, \
        "the servers' own secrets go to the servers only"
    mlflow_env = auth.server_env(params, "mlflow", found)
    config = Path(mlflow_env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert "default_permission = NO_PERMISSIONS" in config and found.mlflow_password not in config
    assert auth.server_env(params, "worker", found) == {}

    copy = tmp_path / "copied-credentials.json"
    copy.write_text(path.read_text())
    copy.chmod(0o600)
    remote = worker_env(params, "http://stack-host:4200/api", "http://stack-host:5000", base={}, credentials=copy)
    assert remote["PREFECT_API_AUTH_STRING"] == found.prefect_auth_string
    assert remote["MLFLOW_TRACKING_PASSWORD"] == found.mlflow_password
