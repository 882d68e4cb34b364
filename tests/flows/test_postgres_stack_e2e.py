"""Issue 15: `stack.database: postgres` — `stack up` creates and starts a local PostgreSQL cluster
behind the Prefect and MLflow servers, `stack down` stops it with everything else, and a restart keeps
the registry and the flow-run history (both live in the cluster). One cluster and one stack for the
module (an initdb and a boot are a minute of the suite): the arrival burst runs on it after the restart."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient

from deltapatch import stack
from deltapatch.burst import run_burst, write_sources
from deltapatch.stack import postgres
from tests.conftest import free_port
from tests.flows.conftest import new_project

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env"), pytest.mark.xdist_group("postgres-e2e")]

BURST_ARRIVALS = 10
BURST_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def pg_dir() -> Iterator[Path]:
    """A cluster folder the `postgres` system user can enter when the tests run as root (pytest's own
    temp folders are private, mode 700)."""
    folder = Path(tempfile.mkdtemp(prefix="deltapatch-pg-"))
    folder.chmod(0o711)
    try:
        yield folder / "cluster"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_stack(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                   pg_dir: Path) -> Iterator[dict[str, Any]]:
    """The module's PostgreSQL stack (one initdb, one boot); down at the end, nothing left running."""
    params = postgres_project(base_project, tmp_path_factory.mktemp("postgres-stack") / "project", pg_dir)
    try:
        info = stack.up(params)
        assert info["processes"]["postgres"]["healthy"], info
        yield params
    finally:
        entries = list(((stack.read_state(params) or {}).get("processes") or {}).values())
        stack.down(params)
        assert not [e["cmd"] for e in entries if stack.is_running(e)], "stack down left processes running"
        assert not processes_using(pg_dir), processes_using(pg_dir)


def postgres_project(base_project: dict[str, Any], folder: Path, pg_dir: Path,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    stack_overrides = {"prefect_port": free_port(), "mlflow_port": free_port(), "postgres_port": free_port(),
                       "database": "postgres", "postgres_dir": str(pg_dir), "serve_app": False,
                       "watch_stable_seconds": 1.0, "startup_timeout": 300}
    stack_overrides.update((overrides or {}).pop("stack", {}))
    return new_project(base_project, folder, {"stack": stack_overrides, **(overrides or {})})


def processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (a postmaster or backend left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmd:
                found.append(f"{entry.name}: {cmd}")
    return found


def _flow_run_names(api: str) -> set[str]:
    runs = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=10).json()
    return {r["name"] for r in runs}


def test_postgres_stack_up_down_and_restart_keeps_history(postgres_stack: dict[str, Any], pg_dir: Path) -> None:
    params = postgres_stack
    cluster = postgres.cluster(params, stack.stack_settings(params))
    assert stat.S_IMODE(cluster.passfile.stat().st_mode) == 0o600
    password = cluster.passfile.read_text().strip().rsplit(":", 1)[1]
    state_text = (stack.stack_dir(params) / stack.STACK_FILE).read_text()
    assert password not in state_text, "the password never appears in stack.json (nor on a command line)"
    env = stack.process_env(params)
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert password not in env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert not (Path(params["_root"]) / ".deltapatch" / "mlflow.db").exists(), "no sqlite registry beside it"
    assert not list((stack.stack_dir(params) / "prefect").glob("*.db")), "no sqlite Prefect database either"

    urls = stack.urls(params)
    api = urls["prefect_api_url"]
    client = MlflowClient(urls["mlflow_url"], urls["mlflow_url"])
    client.create_registered_model("deltapatch-probe")
    flow = httpx.post(f"{api}/flows/", json={"name": "probe-flow"}, timeout=10).json()
    httpx.post(f"{api}/flow_runs/", json={"flow_id": flow["id"], "name": "probe-run"}, timeout=10).raise_for_status()

    entries = list((stack.read_state(params) or {})["processes"].values())
    stack.down(params)
    assert not [e["cmd"] for e in entries if stack.is_running(e)], "stack down left processes running"
    assert not processes_using(cluster.data), processes_using(cluster.data)
    assert os.path.isdir(cluster.data), "down keeps the cluster (its data is the project's history)"

    again = stack.up(params)  # the same cluster: no initdb, same password
    assert again["processes"]["postgres"]["healthy"], again
    assert "probe-run" in _flow_run_names(api), "the flow-run history survived the restart"
    assert client.get_registered_model("deltapatch-probe").name == "deltapatch-probe"
    assert cluster.passfile.read_text().strip().rsplit(":", 1)[1] == password


def test_every_arrival_of_a_burst_starts_a_run_on_postgres(postgres_stack: dict[str, Any], tmp_path: Path) -> None:
    """Issue 15: an arrival burst on the PostgreSQL stack — every arrival event starts a `patch-task`
    run (bounded: 10 arrivals within 5 s, their runs created within 3 min). `benchmarks/arrival_burst.py`
    runs the full 20-in-10-s burst on PostgreSQL and SQLite side by side."""
    sources = write_sources(tmp_path / "sources", BURST_ARRIVALS, per_class=8)
    result = run_burst(postgres_stack, sources, BURST_WITHIN_S, window_s=180, until_running=False)
    print(result.as_dict())
    assert result.submitted_in_s <= BURST_WITHIN_S + 2, result
    assert result.dropped == 0 and not result.missing, result.as_dict()
