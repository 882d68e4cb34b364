"""The local stack: Prefect server, MLflow server, a `gpu` pool worker, the served deployments, the
inbox watcher and the patch-serving app, all on 127.0.0.1, for one project.

State lives in ``<project>/.deltapatch/stack/``: ``stack.json`` (URLs, ports, PIDs with their start
times, log files), ``logs/<process>.log`` and the Prefect home (``prefect/``: its SQLite database).
The MLflow server serves the project's one registry store, ``.deltapatch/mlflow.db`` with proxied
artifacts in ``.deltapatch/mlartifacts`` — the store commands open directly when the stack is down
(:mod:`deltapatch.registry.store`); with ``MLFLOW_TRACKING_URI`` set, no MLflow server is started and
every process uses that registry. `up` on a partly running stack restarts only the processes that
are down. Every process is started in its own
session (process group); :func:`down` signals exactly the recorded groups, after checking that each
PID still is the process that was started (same start time), with SIGTERM, a second SIGTERM for the
Prefect worker (which ignores the first one for ~20 s), then SIGKILL after ``stack.stop_timeout``.

The code is split by concern: :mod:`.settings` (params.yaml `stack:`, the state file, URLs, the
processes' environment), :mod:`.processes` (spawn, identity, commands and ports), :mod:`.health`
(`status`, `client_env`), :mod:`.auth` (the servers' credentials beyond loopback) and
:mod:`.lifecycle` (`up`, `repair`, `down`, `credentials`). Import from here.
"""

from __future__ import annotations

from deltapatch.stack.health import client_env, mlflow_running, status
from deltapatch.stack.lifecycle import KILL_WAIT_SECONDS, SERVERS, credentials, down, repair, up, wait_healthy
from deltapatch.stack.processes import is_running, serve_app_factory
from deltapatch.stack.settings import (
    DEPLOYMENTS,
    PROCESS_ORDER,
    STACK_FILE,
    StackError,
    StackSettings,
    code_root,
    ensure_flows_importable,
    process_env,
    read_state,
    serve_port,
    settings_dict,
    stack_dir,
    stack_settings,
    urls,
)

__all__ = [
    "DEPLOYMENTS",
    "KILL_WAIT_SECONDS",
    "PROCESS_ORDER",
    "SERVERS",
    "STACK_FILE",
    "StackError",
    "StackSettings",
    "client_env",
    "code_root",
    "credentials",
    "down",
    "ensure_flows_importable",
    "is_running",
    "mlflow_running",
    "process_env",
    "read_state",
    "repair",
    "serve_app_factory",
    "serve_port",
    "settings_dict",
    "stack_dir",
    "stack_settings",
    "status",
    "up",
    "urls",
    "wait_healthy",
]
