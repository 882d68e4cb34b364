"""The stack's settings (params.yaml `stack:`), its state file, URLs and the environment of its processes."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import deltapatch
from deltapatch.config import ConfigError, project_root, resolve_path, section, state_dir
from deltapatch.errors import DeltapatchError
from deltapatch.faults import prefect_client_env
from deltapatch.registry.tracking import external_registry, registry_settings
from deltapatch.stack import postgres
from deltapatch.stack.auth import stack_credentials
from deltapatch.telemetry import QUIETED_MARKER, TELEMETRY_OFF

STACK_FILE = "stack.json"
PROCESS_ORDER = ("postgres", "prefect", "mlflow", "worker", "deployments", "watcher", "serve")
DATABASES = ("sqlite", "postgres")
# the deployments `flows.serve` creates (train-patch/gpu runs on the work pool, the others are served)
DEPLOYMENTS = ("patch-task/patch-task", "train-patch/gpu", "rollback-patch/rollback-patch",
               "rebase-patches/rebase-patches", "rollback-base/rollback-base")


class StackError(DeltapatchError):
    """The local stack could not be started, checked or stopped."""


@dataclass
class StackSettings:
    """params.yaml `stack:` section.

    host: interface every server binds to.
    prefect_port, mlflow_port: ports (a busy port stops `stack up` with a clear error).
    gpu_pool: the Prefect work pool of the training step; pool_concurrency: runs at once on it
        (0 = one per visible CUDA device, at least 1).
    serve_app: also start the patch-serving HTTP app (deltapatch.serve) on registry.serve_port, the
        port `deltapatch serve` uses too (one key for one app).
    startup_timeout, stop_timeout: seconds to wait for health / for processes to exit.
    worker_query_seconds, runner_poll_seconds: how often the worker / the served deployments poll.
    watch_interval, watch_stable_seconds: inbox polling period; how long a dropped dataset must stay
        unchanged before it counts as complete.
    database: `sqlite` (embedded files) or `postgres` (a local PostgreSQL cluster the stack starts and
        stops, behind the Prefect server and the MLflow registry: :mod:`deltapatch.stack.postgres`).
    postgres_port, postgres_dir: where that cluster listens / lives ('' = .deltapatch/stack/postgres).
    result_storage: a folder every worker machine reaches (relative to the project, or absolute: a
        shared mount) where flow results — the trained patch on its way back from a GPU worker — are
        written, through the Prefect block `local-file-system/<result_block>`; or `block:TYPE/NAME`,
        a Prefect storage block you created (e.g. `block:s3-bucket/deltapatch-results`).
    worker_limit: training runs at once on the stack's own worker (0: no limit of its own; the pool's
        pool_concurrency still caps the fleet). 1 leaves the other runs to other machines' workers.
    """

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    gpu_pool: str = "gpu"
    pool_concurrency: int = 0
    serve_app: bool = True
    startup_timeout: float = 240.0
    stop_timeout: float = 30.0
    worker_query_seconds: float = 2.0
    runner_poll_seconds: float = 1.0
    watch_interval: float = 1.0
    watch_stable_seconds: float = 2.0
    database: str = "sqlite"
    postgres_port: int = 5442
    postgres_dir: str = ""
    result_storage: str = ".deltapatch/results"
    worker_limit: int = 0


RESULT_BLOCK_NAME = "deltapatch-results"
BLOCK_PREFIX = "block:"


def result_block_slug(settings: StackSettings) -> str:
    """The Prefect storage block of flow results: `TYPE/NAME` given as `block:TYPE/NAME`, else the
    LocalFileSystem block the stack keeps for the `result_storage` folder."""
    value = settings.result_storage.strip()
    if value.startswith(BLOCK_PREFIX):
        return value[len(BLOCK_PREFIX):]
    return f"local-file-system/{RESULT_BLOCK_NAME}"


def result_folder(params: dict[str, Any]) -> Path | None:
    """The shared results folder (None when `result_storage` names a block of the user's)."""
    value = stack_settings(params).result_storage.strip()
    if value.startswith(BLOCK_PREFIX):
        return None
    return resolve_path(params, value).resolve()


def stack_settings(params: dict[str, Any]) -> StackSettings:
    settings = section(params, "stack", StackSettings)
    if settings.database not in DATABASES:
        raise ConfigError(f"params.yaml: stack.database is {settings.database!r}; expected one of {list(DATABASES)}")
    return settings


def uses_postgres(params: dict[str, Any]) -> bool:
    return stack_settings(params).database == "postgres"


def stack_dir(params: dict[str, Any]) -> Path:
    path = state_dir(params) / "stack"
    (path / "logs").mkdir(parents=True, exist_ok=True)
    return path


def read_state(params: dict[str, Any]) -> dict[str, Any] | None:
    path = state_dir(params) / "stack" / STACK_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_state(params: dict[str, Any], state: dict[str, Any]) -> None:
    path = stack_dir(params) / STACK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def serve_port(params: dict[str, Any]) -> int:
    return int(registry_settings(params).serve_port)


def urls(params: dict[str, Any]) -> dict[str, str]:
    settings = stack_settings(params)
    host = settings.host
    return {
        "prefect_url": f"http://{host}:{settings.prefect_port}",
        "prefect_api_url": f"http://{host}:{settings.prefect_port}/api",
        "mlflow_url": external_registry() or f"http://{host}:{settings.mlflow_port}",
        "serve_url": f"http://{host}:{serve_port(params)}",
    }


def code_root() -> Path:
    """The folder holding `flows/` (the source the deployments are built from): the checkout that
    holds this `deltapatch` package, else wherever an installed `flows` package lives."""
    checkout = Path(deltapatch.__file__).resolve().parent.parent
    if (checkout / "flows" / "patch_task.py").is_file():
        return checkout
    import flows  # lazy: not always on sys.path (ensure_flows_importable calls this to put it there)

    return Path(flows.__file__).resolve().parent.parent


def ensure_flows_importable() -> None:
    """Make `import flows` work from any folder (an editable install made before flows/ existed
    does not map it)."""
    root = str(code_root())
    if root not in sys.path:
        sys.path.insert(0, root)


def process_env(params: dict[str, Any], state: dict[str, Any] | None = None) -> dict[str, str]:
    """Environment of every stack process (and of clients talking to the stack)."""
    settings = stack_settings(params)
    u = urls(params)
    env = dict(os.environ)
    for key in env.pop(QUIETED_MARKER, "").split(","):  # the CLI's quiet switches: the logs keep INFO
        env.pop(key, None)
    env.update(TELEMETRY_OFF)
    root = project_root(params).resolve()
    env.update({
        "PREFECT_HOME": str(stack_dir(params) / "prefect"),
        "PREFECT_API_URL": u["prefect_api_url"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, int(settings.runner_poll_seconds))),
        "PREFECT_WORKER_QUERY_SECONDS": str(settings.worker_query_seconds),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PREFECT_UI_API_URL": u["prefect_api_url"],
        "MLFLOW_TRACKING_URI": u["mlflow_url"],
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "DELTAPATCH_PROJECT": str(root),
        "PYTHONUNBUFFERED": "1",
        # Flow results (the trained patch coming back from a GPU worker) go to storage every machine
        # reaches, never to one machine's PREFECT_HOME: deltapatch.stack.results.
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": result_block_slug(settings),
    })
    if settings.database == "postgres":  # the password comes from PGPASSFILE, never from a URL
        cluster = postgres.cluster(params, settings)
        env.update(postgres.client_env(cluster))
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = cluster.prefect_url
    credentials = stack_credentials(params)
    if credentials is not None:  # every client of the servers logs in (deltapatch.stack.auth)
        env.update(credentials.client_env())
    env.update(prefect_client_env(params))  # Prefect clients ride out a server restart (faults.outage_window_s)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_root()), path) if p)
    return env


def settings_dict(params: dict[str, Any]) -> dict[str, Any]:
    return asdict(stack_settings(params))
