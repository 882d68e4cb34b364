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
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltapatch.config import ConfigError, project_root, section, state_dir
from deltapatch.errors import DeltapatchError
from deltapatch.registry.store import check_single_store, init_store, project_store
from deltapatch.registry.tracking import external_registry, registry_settings
from deltapatch.telemetry import QUIETED_MARKER, TELEMETRY_OFF

STACK_FILE = "stack.json"
PROCESS_ORDER = ("prefect", "mlflow", "worker", "deployments", "watcher", "serve")
# the deployments `flows.serve` creates (train-patch/gpu runs on the work pool, the others are served)
DEPLOYMENTS = ("patch-task/patch-task", "train-patch/gpu", "rollback-patch/rollback-patch")


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


def stack_settings(params: dict[str, Any]) -> StackSettings:
    return section(params, "stack", StackSettings)


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
    import deltapatch

    checkout = Path(deltapatch.__file__).resolve().parent.parent
    if (checkout / "flows" / "patch_task.py").is_file():
        return checkout
    import flows

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
    })
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_root()), path) if p)
    return env


# ------------------------------------------------------------------------------------- processes


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
    import httpx

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
    cmds = {
        "prefect": [py, "-m", "prefect", "server", "start", "--host", settings.host,
                    "--port", str(settings.prefect_port)],
        "mlflow": [py, "-m", "mlflow", "server", "--backend-store-uri", registry.uri,
                   "--artifacts-destination", str(registry.artifacts.resolve()), "--host", settings.host,
                   "--port", str(settings.mlflow_port), "--workers", "1"],
        "worker": [py, "-m", "prefect", "worker", "start", "--pool", settings.gpu_pool, "--type", "process",
                   "--name", f"gpu-worker-{socket.gethostname()}"],
        "deployments": [py, "-m", "flows.serve", "--project", root],
        "watcher": [*_deltapatch_cmd(), "watch", "--interval", str(settings.watch_interval),
                    "--stable-seconds", str(settings.watch_stable_seconds)],
        "serve": [py, "-m", "uvicorn", "--factory", "deltapatch.stack:serve_app_factory", "--host", settings.host,
                  "--port", str(serve_port(params))],
    }
    if not settings.serve_app or not _serve_available():
        cmds.pop("serve")
    if external_registry():
        cmds.pop("mlflow")
    return cmds


def _ports(params: dict[str, Any], settings: StackSettings, names: Iterable[str]) -> dict[str, tuple[str, int]]:
    """process → (params.yaml key, port) of the servers among `names`."""
    known = {"prefect": ("stack.prefect_port", settings.prefect_port),
             "mlflow": ("stack.mlflow_port", settings.mlflow_port),
             "serve": ("registry.serve_port", serve_port(params))}
    return {name: known[name] for name in names if name in known}


def _serve_available() -> bool:
    import importlib.util

    try:
        spec = importlib.util.find_spec("deltapatch.serve")
    except ImportError:
        return False
    if spec is None or not spec.origin:
        return False
    return "def create_app" in Path(spec.origin).read_text()


def serve_app_factory() -> Any:
    """uvicorn --factory entry: the registry's serving app for $DELTAPATCH_PROJECT."""
    from deltapatch.config import load_params
    from deltapatch.serve import create_app

    return create_app(load_params())


# ------------------------------------------------------------------------------------- health


def _health(params: dict[str, Any], name: str, state: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, detail) of one process."""
    import httpx

    settings = stack_settings(params)
    u = urls(params)
    entry = state.get("processes", {}).get(name)
    if not entry or not is_running(entry):
        return False, "not running"
    try:
        if name == "prefect":
            return (_http_ok(u["prefect_api_url"] + "/health"), u["prefect_url"])
        if name == "mlflow":
            return (_http_ok(u["mlflow_url"] + "/health"), u["mlflow_url"])
        if name == "serve":
            return (_http_ok(u["serve_url"] + "/health") or _http_ok(u["serve_url"] + "/docs"), u["serve_url"])
        if name == "worker":
            r = httpx.post(f"{u['prefect_api_url']}/work_pools/{settings.gpu_pool}/workers/filter", json={}, timeout=3)
            online = [w["name"] for w in (r.json() if r.status_code == 200 else []) if w.get("status") == "ONLINE"]
            return bool(online), f"pool '{settings.gpu_pool}': {len(online)} online worker(s)"
        if name == "deployments":
            names = DEPLOYMENTS
            found = []
            for dep in names:
                r = httpx.get(f"{u['prefect_api_url']}/deployments/name/{dep}", timeout=3)
                if r.status_code == 200 and (dep == "train-patch/gpu" or r.json().get("status") == "READY"):
                    found.append(dep)
            return len(found) == len(names), f"{len(found)}/{len(names)} deployments ready"
        if name == "watcher":
            beat = stack_dir(params) / "watcher.heartbeat"
            age = time.time() - beat.stat().st_mtime if beat.exists() else float("inf")
            return age < 15 * max(1.0, settings.watch_interval), f"inbox polled {age:.0f} s ago" if age != float("inf") else "no heartbeat yet"
    except (httpx.HTTPError, ValueError) as exc:
        return False, f"health check failed: {exc}"
    return True, ""


def status(params: dict[str, Any]) -> dict[str, Any]:
    """URLs and per-process health (pid, running, healthy, detail, log)."""
    state = read_state(params) or {}
    out = {"urls": state.get("urls", urls(params)), "processes": {}, "running": False}
    for name in PROCESS_ORDER:
        entry = state.get("processes", {}).get(name)
        if entry is None:
            continue
        healthy, detail = _health(params, name, state)
        running = is_running(entry)
        out["processes"][name] = {"pid": entry["pid"], "running": running, "healthy": healthy,
                                  "detail": detail, "log": entry["log"]}
        out["running"] = out["running"] or running
    return out


# ------------------------------------------------------------------------------------- up / down


def up(params: dict[str, Any], on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start every process, wait until each is healthy; on any failure stop what was started.

    On a partly running stack, restart only the processes that are down (:func:`repair`).
    """
    say = on_progress or (lambda _msg: None)
    settings = stack_settings(params)
    if not external_registry():
        check_single_store(state_dir(params))  # never serve one half of a split registry
    previous = read_state(params)
    if previous and any(is_running(e) for e in previous.get("processes", {}).values()):
        return repair(params, previous, say)
    cmds = _commands(params, settings)
    if "serve" in cmds:  # the same rule as `deltapatch serve`: never beyond loopback without a token
        # Lazy: deltapatch.serve imports torch and FastAPI, which `stack status/down` never need.
        from deltapatch.serve import check_exposure, serve_settings

        check_exposure(settings.host, serve_settings(params))
    ports = dict(_ports(params, settings, cmds).values())
    busy = [f"{key}={port}" for key, port in ports.items() if not _port_free(settings.host, int(port))]
    if busy:
        raise StackError(f"port(s) already in use on {settings.host}: {', '.join(busy)}; stop whatever holds "
                         f"them or pick other ports in params.yaml (the keys named above)")
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"params.yaml: stack ports must differ, got {ports}")
    if "mlflow" in cmds:
        init_store(project_store(state_dir(params)).uri)  # created once, before server and clients race
    env = process_env(params)
    root = project_root(params).resolve()
    stack_urls = urls(params)  # nested for `status`, flat for readers of one key (registry.tracking)
    state: dict[str, Any] = {"project": str(root), "urls": stack_urls, "processes": {},
                             "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code_root": str(code_root()),
                             **stack_urls}
    deadline = time.monotonic() + settings.startup_timeout

    def start(names: list[str]) -> None:
        for name in names:
            if name in cmds:
                state["processes"][name] = _spawn(params, name, cmds[name], env, root)
                say(f"started {name} (pid {state['processes'][name]['pid']})")
        _write_state(params, state)
        wait_healthy(params, [n for n in names if n in cmds], state, deadline, say)

    try:
        start(["prefect", "mlflow"])
        start(["worker", "deployments", "watcher", "serve"])
    except BaseException:
        say("start-up failed: stopping what was started")
        down(params)
        raise
    info = status(params)
    info["started"], info["kept"] = list(state["processes"]), []
    return info


def repair(params: dict[str, Any], state: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Restart the processes of a partly running stack that are down; the others (and the flow runs
    they hold) keep running untouched. Returns the status with the `started` and `kept` names."""
    settings = stack_settings(params)
    cmds = _commands(params, settings)
    entries = state.setdefault("processes", {})
    kept = [n for n in PROCESS_ORDER if n in cmds and n in entries and is_running(entries[n])]
    dead = [n for n in PROCESS_ORDER if n in cmds and n not in kept]
    for name, (key, port) in _ports(params, settings, dead).items():
        if not _port_free(settings.host, int(port)) and name in entries:
            # A dead server's children can outlive it and hold its port (MLflow's uvicorn): that group is ours.
            _signal_group(entries[name], signal.SIGKILL, leader_check=False)
            _wait_port_free(settings.host, int(port), KILL_WAIT_SECONDS)
        if not _port_free(settings.host, int(port)):
            raise StackError(f"{name} is down but port {port} ({key}) is in use by another program; stop it or "
                             f"change {key} in params.yaml, then run `deltapatch stack up` again")
    env = process_env(params)
    root = project_root(params).resolve()
    deadline = time.monotonic() + settings.startup_timeout
    for name in dead:
        entries[name] = _spawn(params, name, cmds[name], env, root)
        say(f"restarted {name} (pid {entries[name]['pid']}): it was down")
        _write_state(params, state)
        wait_healthy(params, [name], state, deadline, say)
    if kept:
        listed = ", ".join(f"{n} (pid {entries[n]['pid']})" for n in kept)
        say(f"kept running: {listed}")
    info = status(params)
    info["started"], info["kept"] = dead, kept
    return info


def _wait_port_free(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _port_free(host, port) and time.monotonic() < deadline:
        time.sleep(0.2)


def wait_healthy(params: dict[str, Any], names: list[str], state: dict[str, Any], deadline: float,
                 say: Callable[[str], None]) -> None:
    pending = list(names)
    while pending:
        for name in list(pending):
            entry = state["processes"][name]
            if not is_running(entry):
                tail = _tail(Path(entry["log"]))
                raise StackError(f"{name} exited during start-up; last lines of {entry['log']}:\n{tail}")
            healthy, detail = _health(params, name, state)
            if healthy:
                say(f"{name} healthy ({detail})")
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            raise StackError(f"timed out waiting for {', '.join(pending)} to become healthy; see the logs in "
                             f"{stack_dir(params) / 'logs'} (or raise stack.startup_timeout)")
        if pending:
            time.sleep(1.0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


SERVERS = ("prefect", "mlflow")
KILL_WAIT_SECONDS = 5.0


def down(params: dict[str, Any], on_progress: Callable[[str], None] | None = None) -> list[str]:
    """Stop exactly the recorded processes (their process groups); returns the names stopped.

    Clients first, servers second: the served deployments and the worker report to the Prefect API
    while they shut down, and with the server already gone they retry until killed.
    """
    say = on_progress or (lambda _msg: None)
    settings = stack_settings(params)
    state = read_state(params)
    if not state:
        return []
    entries = state.get("processes", {})
    live = {n: entries[n] for n in reversed(PROCESS_ORDER) if n in entries and is_running(entries[n])}
    clients = {n: e for n, e in live.items() if n not in SERVERS}
    servers = {n: e for n, e in live.items() if n in SERVERS}
    stopped = _stop(clients, settings.stop_timeout, say) + _stop(servers, settings.stop_timeout, say)
    state["processes"] = {}
    state["stopped_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_state(params, state)
    return stopped


def _stop(live: dict[str, dict[str, Any]], timeout: float, say: Callable[[str], None]) -> list[str]:
    """SIGTERM, wait up to `timeout`, SIGKILL what is left and wait until it is gone."""
    for entry in live.values():
        _signal_group(entry, signal.SIGTERM)
    if "worker" in live:  # the Prefect worker ignores the first SIGTERM for ~20 s; a second ends it
        time.sleep(1.0)
        _signal_group(live["worker"], signal.SIGTERM)
    _wait_gone(live.values(), timeout)
    for name, entry in live.items():
        if is_running(entry):
            say(f"{name} did not stop within {timeout:.0f} s: SIGKILL")
            _signal_group(entry, signal.SIGKILL)
        say(f"stopped {name} (pid {entry['pid']})")
    _wait_gone(live.values(), KILL_WAIT_SECONDS)  # a killed process takes a moment to disappear
    # children left in a group whose leader exited (e.g. a flow-run subprocess): kill the group
    for entry in live.values():
        _signal_group(entry, signal.SIGKILL, leader_check=False)
    return list(live)


def _wait_gone(entries: Iterable[dict[str, Any]], timeout: float) -> None:
    entries = list(entries)
    deadline = time.monotonic() + timeout
    while any(is_running(e) for e in entries) and time.monotonic() < deadline:
        time.sleep(0.3)


def _signal_group(entry: dict[str, Any], sig: int, leader_check: bool = True) -> None:
    """Signal the process group we created; only while its leader is still the recorded process,
    or (leader_check False) when the group still exists without its leader."""
    pgid = int(entry.get("pgid", entry["pid"]))
    if leader_check and not is_running(entry):
        return
    if not leader_check and _proc_start_time(pgid) is not None:
        return  # the pid exists again but is not ours (or still ours; handled above)
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def mlflow_running(params: dict[str, Any]) -> bool:
    """The stack's MLflow server (which holds the registry files open) is running."""
    entry = (read_state(params) or {}).get("processes", {}).get("mlflow")
    return bool(entry) and is_running(entry)


def client_env(params: dict[str, Any]) -> dict[str, str] | None:
    """PREFECT_API_URL/PREFECT_HOME/MLFLOW_TRACKING_URI of the running stack, None when it is down."""
    state = read_state(params)
    if not state or not any(is_running(e) for e in state.get("processes", {}).values()):
        return None
    env = process_env(params, state)
    return {k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")}


def settings_dict(params: dict[str, Any]) -> dict[str, Any]:
    return asdict(stack_settings(params))
