"""Bring the stack up (or repair a partly running one) and down."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from deltapatch.automations import ensure_zombie_automation
from deltapatch.config import ConfigError, project_root, state_dir
from deltapatch.errors import DeltapatchError
from deltapatch.faults import fault_settings
from deltapatch.registry.store import check_single_store, init_store, inspect_store, project_store
from deltapatch.registry.tracking import external_registry
from deltapatch.stack import auth, postgres
from deltapatch.stack.health import _health, status
from deltapatch.stack.processes import _commands, _port_free, _ports, _proc_start_time, _spawn, is_running
from deltapatch.stack.settings import (
    PROCESS_ORDER,
    StackError,
    StackSettings,
    _write_state,
    code_root,
    process_env,
    read_state,
    stack_dir,
    stack_settings,
    urls,
)

SERVERS = ("prefect", "mlflow")
KILL_WAIT_SECONDS = 5.0


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
    _check_exposure(params, settings, cmds)
    ports = dict(_ports(params, settings, cmds).values())
    busy = [f"{key}={port}" for key, port in ports.items() if not _port_free(settings.host, int(port))]
    if busy:
        raise StackError(f"port(s) already in use on {settings.host}: {', '.join(busy)}; stop whatever holds "
                         f"them or pick other ports in params.yaml (the keys named above)")
    if len(set(ports.values())) != len(ports):
        raise ConfigError(f"params.yaml: stack ports must differ, got {ports}")
    if "mlflow" in cmds and "postgres" not in cmds:
        init_store(project_store(state_dir(params)).uri)
    if "mlflow" in cmds and "postgres" in cmds:
        _refuse_a_second_registry(params)  # created once, before server and clients race
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
                state["processes"][name] = _start(params, settings, name, cmds[name], env, root)
                say(f"started {name} (pid {state['processes'][name]['pid']})")
        _write_state(params, state)
        wait_healthy(params, [n for n in names if n in cmds], state, deadline, say)

    try:
        if "postgres" in cmds:
            start_postgres(params, say, lambda: start(["postgres"]))
        start(["prefect", "mlflow"])
        start(["worker", "deployments", "watcher", "serve"])
        _ensure_zombie_guard(params, say)
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
    _check_exposure(params, settings, dead)  # before anything is killed or started
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
        def restart(name: str = name) -> None:
            entries[name] = _start(params, settings, name, cmds[name], env, root)
            say(f"restarted {name} (pid {entries[name]['pid']}): it was down")
            _write_state(params, state)
            wait_healthy(params, [name], state, deadline, say)

        if name == "postgres":
            start_postgres(params, say, restart)
        else:
            restart()
    if kept:
        listed = ", ".join(f"{n} (pid {entries[n]['pid']})" for n in kept)
        say(f"kept running: {listed}")
    _ensure_zombie_guard(params, say)
    info = status(params)
    info["started"], info["kept"] = dead, kept
    return info


def credentials(params: dict[str, Any], rotate: bool = False) -> Path:
    """The stack's credentials file, created when missing; `rotate` replaces the secrets, only while
    every process is down (running servers keep checking the old ones)."""
    state = read_state(params) or {}
    if rotate and any(is_running(e) for e in state.get("processes", {}).values()):
        raise StackError("the stack is running: its servers check the current credentials until they stop",
                         hint="`deltapatch stack down`, then rotate, `deltapatch stack up`, and copy the new file "
                              "to every other machine's worker")
    return auth.create_credentials(params, rotate=rotate)


def _check_exposure(params: dict[str, Any], settings: StackSettings, names: Iterable[str]) -> None:
    """The rules for every path that starts a process (`up`, `repair`), before anything starts: the
    Prefect and MLflow servers never on a host beyond loopback without the stack's credentials
    (deltapatch.stack.auth), the serving app never there without a token (deltapatch.serve)."""
    names = list(names)
    if any(name in SERVERS for name in names):
        auth.require_credentials(params, settings.host)
    auth.use_credentials(params)  # this process's health checks and API calls log in too
    if "serve" in names:
        # deltapatch.serve imports torch and FastAPI, which `stack status/down` never need.
        from deltapatch.serve import check_exposure, serve_settings  # lazy: heavy (torch + FastAPI)

        check_exposure(settings.host, serve_settings(params))


def _start(params: dict[str, Any], settings: StackSettings, name: str, cmd: list[str], env: dict[str, str],
           root: Path) -> dict[str, Any]:
    """Spawn one stack process; the serving app only after the exposure check (whatever the path)."""
    _check_exposure(params, settings, [name])
    credentials = auth.stack_credentials(params)
    if credentials is not None:
        env = {**env, **auth.server_env(params, name, credentials)}
    return _spawn(params, name, cmd, env, root)


def _ensure_zombie_guard(params: dict[str, Any], say: Callable[[str], None]) -> None:
    """The automation that crashes training runs whose worker died (deltapatch.automations):
    created, or repaired when deleted, edited or disabled — like a stopped process."""
    try:
        found = ensure_zombie_automation(urls(params)["prefect_api_url"], fault_settings(params))
    except DeltapatchError as exc:
        raise StackError(f"could not set up the zombie automation: {exc}") from exc
    say(f"zombie automation {found.action}: {found.detail}")


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
    clients = {n: e for n, e in live.items() if n not in SERVERS and n != "postgres"}
    servers = {n: e for n, e in live.items() if n in SERVERS}
    stopped = _stop(clients, settings.stop_timeout, say) + _stop(servers, settings.stop_timeout, say)
    if "postgres" in live:  # last: the Prefect and MLflow servers write to it until they exit
        stopped += _stop_postgres(live["postgres"], settings.stop_timeout, say)
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


def _refuse_a_second_registry(params: dict[str, Any]) -> None:
    """A project whose patches are in its sqlite store must not silently get an empty registry on a
    new PostgreSQL cluster (the same rule as for a split registry: never pick one of two stores)."""
    cluster = postgres.cluster(params, stack_settings(params))
    found = inspect_store(project_store(state_dir(params)).db)
    if not cluster.initialised and not found.empty:
        raise StackError(f"stack.database is postgres, but this project's registry is in {found.describe()}; a new "
                         "PostgreSQL cluster would start an empty second registry",
                         hint="keep stack.database: sqlite for this project, or start a new project for postgres "
                              "(moving a registry between databases is not automated)")


def start_postgres(params: dict[str, Any], say: Callable[[str], None], start: Callable[[], None]) -> None:
    """Create the cluster when missing (initdb, generated password), start its server with `start`
    (spawn + wait until healthy), then create the Prefect and MLflow databases when missing."""
    cluster = postgres.cluster(params, stack_settings(params))
    if postgres.prepare(cluster):
        say(f"created the PostgreSQL cluster {cluster.data} (password in {cluster.passfile}, mode 0600)")
    start()
    created = postgres.ensure_databases(cluster)
    if created:
        say(f"created the PostgreSQL database(s) {', '.join(created)}")


def _stop_postgres(entry: dict[str, Any], timeout: float, say: Callable[[str], None]) -> list[str]:
    """Fast shutdown (SIGINT to the postmaster), immediate shutdown if it hangs, SIGKILL last."""
    for sig in postgres.STOP_SIGNALS:
        if is_running(entry):
            os.kill(int(entry["pid"]), sig)
            _wait_gone([entry], timeout)
    if is_running(entry):
        say(f"postgres did not stop within {timeout:.0f} s: SIGKILL")
        _signal_group(entry, signal.SIGKILL)
        _wait_gone([entry], KILL_WAIT_SECONDS)
    _signal_group(entry, signal.SIGKILL, leader_check=False)  # backends left without their postmaster
    say(f"stopped postgres (pid {entry['pid']})")
    return ["postgres"]


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

