"""The stack's processes: start one in its own session, know whether it still runs, the commands and
ports of each, and the serving app's uvicorn entry."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from deltapatch.config import load_params, project_root, state_dir
from deltapatch.registry.store import project_store
from deltapatch.registry.tracking import external_registry
from deltapatch.stack import postgres
from deltapatch.stack.auth import stack_credentials
from deltapatch.stack.settings import StackSettings, serve_port, stack_dir


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of `pid` (field 22 of /proc/PID/stat), None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return "?"  # no /proc (macOS): existence only
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # zombie: exited
    return fields[19]


def is_running(entry: dict[str, Any]) -> bool:
    """The recorded process still exists and is the one we started (same start time)."""
    now = _proc_start_time(int(entry["pid"]))
    return now is not None and (now == "?" or now == entry.get("start_time"))


def _spawn(params: dict[str, Any], name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    log_path = stack_dir(params) / "logs" / f"{name}.log"
    log = open(log_path, "ab")  # noqa: SIM115 (handed to the child)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    return {"pid": proc.pid, "pgid": proc.pid, "start_time": _proc_start_time(proc.pid), "cmd": cmd,
            "log": str(log_path)}


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _deltapatch_cmd() -> list[str]:
    script = Path(sys.executable).with_name("deltapatch")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from deltapatch.cli import app; app()"]


def _commands(params: dict[str, Any], settings: StackSettings) -> dict[str, list[str]]:
    sd = stack_dir(params)
    (sd / "prefect").mkdir(parents=True, exist_ok=True)
    registry = project_store(state_dir(params))  # the same store every command opens without a server
    py = sys.executable
    root = str(project_root(params).resolve())
    cluster = postgres.cluster(params, settings) if settings.database == "postgres" else None
    backend = cluster.mlflow_url if cluster else registry.uri
    cmds = {
        "postgres": postgres.server_command(cluster) if cluster else [],
        "prefect": [py, "-m", "prefect", "server", "start", "--host", settings.host,
                    "--port", str(settings.prefect_port)],
        "mlflow": [py, "-m", "mlflow", "server", "--backend-store-uri", backend,
                   "--artifacts-destination", str(registry.artifacts.resolve()), "--host", settings.host,
                   "--port", str(settings.mlflow_port), "--workers", "1",
                   # MLflow's own basic-auth app whenever the stack has credentials (deltapatch.stack.auth)
                   *(["--app-name", "basic-auth"] if stack_credentials(params) else [])],
        "worker": [py, "-m", "prefect", "worker", "start", "--pool", settings.gpu_pool, "--type", "process",
                   "--name", f"gpu-worker-{socket.gethostname()}",
                   *(["--limit", str(settings.worker_limit)] if settings.worker_limit > 0 else [])],
        "deployments": [py, "-m", "flows.serve", "--project", root],
        "watcher": [*_deltapatch_cmd(), "watch", "--interval", str(settings.watch_interval),
                    "--stable-seconds", str(settings.watch_stable_seconds)],
    }
    if settings.serve_app and _serve_available():
        cmds["serve"] = [py, "-m", "uvicorn", "--factory", "deltapatch.stack:serve_app_factory",
                         "--host", settings.host, "--port", str(serve_port(params)), *_serve_limits(params)]
    if external_registry():
        cmds.pop("mlflow")
    if not cmds["postgres"]:
        cmds.pop("postgres")
    return cmds


def _ports(params: dict[str, Any], settings: StackSettings, names: Iterable[str]) -> dict[str, tuple[str, int]]:
    """process → (params.yaml key, port) of the servers among `names`."""
    known = {"postgres": ("stack.postgres_port", settings.postgres_port),
             "prefect": ("stack.prefect_port", settings.prefect_port),
             "mlflow": ("stack.mlflow_port", settings.mlflow_port),
             "serve": ("registry.serve_port", serve_port(params))}
    return {name: known[name] for name in names if name in known}


def _serve_limits(params: dict[str, Any]) -> list[str]:
    """The uvicorn limits of `deltapatch serve` (concurrency, timeouts, header size) for the stack's app."""
    from deltapatch.serve import (  # lazy: torch + FastAPI, only with serve_app
        serve_settings,
        uvicorn_cli_args,
    )

    return uvicorn_cli_args(serve_settings(params))


def _serve_available() -> bool:
    try:
        spec = importlib.util.find_spec("deltapatch.serve")
    except ImportError:
        return False
    if spec is None or not spec.origin:
        return False
    return "def create_app" in Path(spec.origin).read_text()


def serve_app_factory() -> Any:
    """uvicorn --factory entry: the registry's serving app for $DELTAPATCH_PROJECT."""
    from deltapatch.serve import create_app  # lazy: torch + FastAPI, needed only in the uvicorn child

    return create_app(load_params())
