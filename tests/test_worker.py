"""Unit tests of the scale-out settings: the worker's environment and addresses, where a worker's
training reads its data, the result storage block, stack.database."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltapatch.config import ConfigError
from deltapatch.stack import stack_settings
from deltapatch.stack.settings import process_env, result_block_slug, result_folder
from deltapatch.worker import (
    WORKER_PROJECT_ENV,
    WorkerError,
    local_task_dir,
    server_urls,
    worker_command,
    worker_env,
)
from tests.conftest import make_project


def test_worker_env_uses_its_own_clone_home_and_the_stacks_servers(tmp_path: Path) -> None:
    params = make_project(tmp_path / "clone", {"stack": {"result_storage": "/mnt/shared/results"}})
    env = worker_env(params, "http://stack:4200/api/", "http://stack:5000", base={"PREFECT_HOME": "/elsewhere"})
    root = str(Path(params["_root"]).resolve())
    assert env["PREFECT_HOME"].startswith(root) and env["PREFECT_HOME"] != "/elsewhere"
    assert env["PREFECT_API_URL"] == "http://stack:4200/api" and env["MLFLOW_TRACKING_URI"] == "http://stack:5000"
    assert env[WORKER_PROJECT_ENV] == root == env["DELTAPATCH_PROJECT"]
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "local-file-system/deltapatch-results"
    assert worker_command("gpu", "w", 1)[-2:] == ["--limit", "1"] and "--limit" not in worker_command("gpu", "w")


def test_worker_needs_the_stacks_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(WorkerError, match="--prefect-api"):
        server_urls(None, "http://stack:5000")
    with pytest.raises(WorkerError, match="server"):
        server_urls("http://stack:4200/api", "sqlite:///tmp/mlflow.db")
    monkeypatch.setenv("PREFECT_API_URL", "http://a:1/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://b:2")
    assert server_urls(None, None) == ("http://a:1/api", "http://b:2")


def test_a_worker_machine_reads_task_data_from_its_own_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = make_project(tmp_path / "clone")
    submitted = "/other-machine/project/data/tasks/shapes"
    monkeypatch.delenv(WORKER_PROJECT_ENV, raising=False)
    assert local_task_dir(params, "shapes", submitted) == submitted
    monkeypatch.setenv(WORKER_PROJECT_ENV, str(params["_root"]))
    assert local_task_dir(params, "shapes", submitted) == str(Path(params["_root"]) / "data" / "tasks" / "shapes")


def test_result_storage_and_database_settings(tmp_path: Path) -> None:
    params = make_project(tmp_path / "p", {"stack": {"result_storage": "block:s3-bucket/results"}})
    assert result_block_slug(stack_settings(params)) == "s3-bucket/results" and result_folder(params) is None
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in process_env(params)  # sqlite: Prefect's default
    params = make_project(tmp_path / "q", {"stack": {"database": "postgres", "postgres_port": 5999}})
    env = process_env(params)
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].endswith("@127.0.0.1:5999/prefect")
    assert env["PGPASSFILE"].endswith("pgpass")
    with pytest.raises(ConfigError, match="stack.database"):
        stack_settings(make_project(tmp_path / "r", {"stack": {"database": "mysql"}}))
