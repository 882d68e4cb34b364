"""Shared fixtures: a throw-away deltapatch project with a quickly pre-trained base model.

`make_project(folder, overrides)` copies the repository's params.yaml into `folder`, applies
overrides (nested dicts) and returns the loaded params. The session-scoped `base_project` has base
weights pre-trained for one epoch (≈20 s on 2 cores), shared by every test that needs a real base.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from deltapatch.telemetry import disable_telemetry

disable_telemetry()
os.environ.setdefault("GIT_AUTHOR_NAME", "deltapatch-tests")
os.environ.setdefault("GIT_AUTHOR_EMAIL", "tests@localhost")
os.environ.setdefault("GIT_COMMITTER_NAME", "deltapatch-tests")
os.environ.setdefault("GIT_COMMITTER_EMAIL", "tests@localhost")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_cli_wide() -> None:
    """The CLI's rich consoles are module-level and read COLUMNS once, when deltapatch.cli is first
    imported: whichever test imported it first would fix every table's width for its whole worker (80
    columns where that test set none, truncating rows other tests read). Import it here, wide, once;
    COLUMNS is restored so that pytest's own output keeps the terminal's width."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "400"
    try:
        import deltapatch.cli  # noqa: F401 (imported for its consoles' width)
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


_import_cli_wide()

# `make test` runs two pytest-xdist workers on CI's two cores. One torch thread per worker (and per
# process a worker starts: stack servers, flow runs and trainings inherit the variable) keeps the two
# from oversubscribing the cores; torch reads it when first imported, which happens after this line.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first: the end-to-end tests (real servers, minutes each) start before the unit tests, so
    that two workers finish together instead of one waiting out the last stack test alone. The sort
    is stable (same order on every worker, as xdist requires) and changes nothing without xdist."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


LOADGROUP_BROKEN = "pytest 9.2 with pytest-xdist <= 3.8 drops xdist_group under --dist loadgroup (pytest-xdist#1386)"


def pytest_configure(config: pytest.Config) -> None:
    """Refuse, with the reason, the pair of versions on which --dist loadgroup loses its groups (each
    module stack would then boot once per worker); pyproject pins pytest below it."""
    from importlib.metadata import version

    major_minor = tuple(int(p) for p in version("pytest").split(".")[:2])
    xdist = tuple(int(p) for p in version("pytest-xdist").split(".")[:2])
    if config.getoption("dist", "no") == "loadgroup" and major_minor >= (9, 2) and xdist <= (3, 8):
        raise pytest.UsageError(f"{LOADGROUP_BROKEN}; install pytest<9.2 (`make setup` does)")


def pytest_collection_finish(session: pytest.Session) -> None:
    """The same, seen on a worker (whatever the versions): with --dist loadgroup every xdist_group test
    must carry its group in its node id, which is how pytest-xdist keeps a group on one worker."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup is not grouping {len(lost)} test(s), e.g. {lost[0]}: {LOADGROUP_BROKEN}?")


def _merge(into: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def make_project(folder: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create a project (params.yaml only) in `folder`; returns its loaded params."""
    from deltapatch.config import load_params

    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    # Tests train for few steps on tiny data: no step budget unless a test sets one.
    _merge(params, {"train": {"threads": 0, "min_steps": 0}})
    _merge(params, overrides or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return load_params(folder)


@pytest.fixture(scope="session")
def base_project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project whose base model is pre-trained for 1 epoch (shared, read-only for tests)."""
    from deltapatch.models.pretrain import pretrain_base

    folder = tmp_path_factory.mktemp("base-project")
    params = make_project(folder, {"pretrain": {"epochs": 1}})
    pretrain_base(params, progress=False)
    return params


@pytest.fixture
def project(base_project: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A fresh project folder that reuses the session's base weights (copied, so tests may modify)."""
    from deltapatch.config import load_params

    source = Path(base_project["_root"])
    shutil.copy(source / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(source / "models", tmp_path / "models")
    return copy.deepcopy(load_params(tmp_path))


TINY_BENCH = {"epochs": 1, "max_train_per_class": 4, "max_eval_per_class": 3, "latency_batch": 4,
              "latency_repeats": 1, "latency_warmup": 0}


@pytest.fixture(scope="module")
def context(base_project: dict[str, Any]) -> Any:
    """A bench context (pristine base + base-test reference logits) on the session's base, base data capped."""
    from deltapatch.bench import BenchSettings, open_context

    ctx, _ = open_context(base_project, BenchSettings(**TINY_BENCH), seed=0, progress=False)
    return ctx


@pytest.fixture(scope="module")
def tiny_task(base_project: dict[str, Any]) -> Any:
    """`shapes` with 4 training images per class (20) and 3 val/test images per class."""
    from deltapatch.bench import BenchSettings
    from deltapatch.data.sources import builtin_task, capped

    return capped(builtin_task(base_project, "shapes", per_class=12), BenchSettings(**TINY_BENCH), seed=0)


@pytest.fixture(scope="session")
def prefect_harness():
    """One real Prefect API (temporary server + SQLite) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow server leaking in from the developer's shell: each project uses its own sqlite store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_PROJECT", raising=False)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for servers a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """A real `mlflow server` on 127.0.0.1:`port` for the store in `folder` (mlflow.db, artifacts proxied
    into folder/mlartifacts, as the stack runs it; log appended to folder/mlflow.log). It gets its own
    process group: the server and the uvicorn process it starts stop together (kill_process_group)."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with (folder / "mlflow.log").open("ab") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--artifacts-destination", str(folder / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)


def kill_process_group(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL, wait_s: float = 30) -> None:
    """Signal `process`'s whole group (SIGKILL: as a crash; a graceful stop waits for open connections)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    process.wait(wait_s)


def wait_for_mlflow(process: subprocess.Popen[bytes], folder: Path, port: int, timeout_s: float = 90) -> str:
    """Block until the server from start_mlflow_server answers /health (its store fully created); its URL."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"mlflow server did not start:\n{(folder / 'mlflow.log').read_text()[-3000:]}")
        time.sleep(0.5)
