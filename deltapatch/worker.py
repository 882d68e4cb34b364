"""A GPU worker on another machine: `deltapatch worker start --project DIR`.

The machine shares nothing with the stack's but network addresses and remote stores. It has

- its own clone of the project (``git clone`` of the project repository: params.yaml, ``data.dvc``,
  the DVC remote's configuration) plus the base weights, and the same code and Python environment;
- its own ``PREFECT_HOME`` (``<its project>/.deltapatch/worker/prefect``) and process tree.

`worker start` is a thin wrapper over ``prefect worker start --pool <stack.gpu_pool> --type process``
with the environment a training run needs (:func:`worker_env`):

- ``DELTAPATCH_WORKER_PROJECT``: training runs use *this* clone, whatever project path the
  submitting machine put in the flow parameters (:func:`deltapatch.pipeline.project_params`), and
  read the task's data from it (:func:`local_task_dir`): the data version in the parameters is
  fetched from git (:func:`fetch_data_version`) and exported from the DVC remote
  (:func:`deltapatch.data.task_data.task_data_at`);
- ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``: the trained patch goes back as the run's result through
  the stack's result storage (a shared folder or S3: :mod:`deltapatch.stack.results`), never through
  a machine's local disk;
- ``MLFLOW_TRACKING_URI``: the stack's MLflow server (registration happens on the stack's machine,
  through the server's HTTP API; artifacts are proxied, ``mlflow-artifacts:`` URIs only);
- ``PYTHONPATH``: this machine's code checkout. The training deployment's pull step enters the code
  folder of the machine that deployed it, so the checkout must sit at that same path here.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from deltapatch.config import project_root, state_dir
from deltapatch.data.versioning import git, resolve_rev, tasks_dir
from deltapatch.errors import DeltapatchError
from deltapatch.stack.auth import load_credentials
from deltapatch.stack.settings import code_root, result_block_slug, stack_settings
from deltapatch.telemetry import TELEMETRY_OFF

WORKER_PROJECT_ENV = "DELTAPATCH_WORKER_PROJECT"


class WorkerError(DeltapatchError):
    """The worker cannot start (no server address, not a project)."""


def worker_project() -> Path | None:
    """The project of this machine's worker (set by `deltapatch worker start`), else None."""
    value = os.environ.get(WORKER_PROJECT_ENV, "").strip()
    return Path(value) if value else None


def worker_name(params: dict[str, Any]) -> str:
    return f"gpu-worker-{socket.gethostname()}-{project_root(params).resolve().name}"


def worker_command(pool: str, name: str, limit: int = 0) -> list[str]:
    """``prefect worker start`` for the process pool; `limit` > 0 caps the runs at once on this worker."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    return [*cmd, "--limit", str(limit)] if limit > 0 else cmd


def worker_env(params: dict[str, Any], prefect_api_url: str, mlflow_url: str,
               base: dict[str, str] | None = None, credentials: Path | None = None) -> dict[str, str]:
    """The environment of a worker (and of the training runs it starts) for the project of `params`;
    with `credentials` (a copy of the stack's file) every call to the stack's servers logs in."""
    root = project_root(params).resolve()
    home = state_dir(params) / "worker" / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    env.update(TELEMETRY_OFF)
    path = env.get("PYTHONPATH", "")
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": prefect_api_url.rstrip("/"),
        "MLFLOW_TRACKING_URI": mlflow_url.rstrip("/"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": str(stack_settings(params).worker_query_seconds),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": result_block_slug(stack_settings(params)),
        "DELTAPATCH_PROJECT": str(root),
        WORKER_PROJECT_ENV: str(root),
        "PYTHONPATH": os.pathsep.join(p for p in (str(code_root()), path) if p),
        "PYTHONUNBUFFERED": "1",
    })
    if credentials is not None:
        env.update(load_credentials(credentials).client_env())
    return env


def server_urls(prefect_api_url: str | None, mlflow_url: str | None) -> tuple[str, str]:
    """The Prefect API and MLflow URLs from the options, else PREFECT_API_URL / MLFLOW_TRACKING_URI."""
    prefect = (prefect_api_url or os.environ.get("PREFECT_API_URL", "")).strip()
    mlflow = (mlflow_url or os.environ.get("MLFLOW_TRACKING_URI", "")).strip()
    missing = [name for name, value in (("--prefect-api (or PREFECT_API_URL)", prefect),
                                        ("--mlflow (or MLFLOW_TRACKING_URI)", mlflow)) if not value]
    if missing:
        raise WorkerError(f"worker start needs the stack's addresses: {', '.join(missing)}",
                          hint="e.g. --prefect-api http://stack-host:4200/api --mlflow http://stack-host:5000")
    if not mlflow.startswith(("http://", "https://")):
        raise WorkerError(f"the MLflow address must be the stack's server (http…), not {mlflow!r}: a worker on "
                          "another machine cannot open the stack's store files")
    return prefect, mlflow


def local_task_dir(params: dict[str, Any], task: str, submitted: str) -> str:
    """On a worker machine, the task folder of *its* clone (the submitted path is the other machine's);
    on the stack's machine, the submitted folder."""
    if worker_project() is None:
        return submitted
    return str(tasks_dir(params) / task)


def fetch_data_version(params: dict[str, Any], data_version: str) -> bool:
    """Make the data version's git commit present in this clone (``git fetch`` from its remotes when
    it is not): a worker's clone predates the arrival. True when a fetch was needed."""
    if not data_version:
        return False
    root = project_root(params).resolve()
    commit = resolve_rev(data_version)
    if _has_commit(root, commit):
        return False
    git(root, "fetch", "--quiet", "--all")
    return True


def _has_commit(root: Path, commit: str) -> bool:
    return bool(git(root, "rev-parse", "--verify", "-q", f"{commit}^{{commit}}", check=False).strip())
