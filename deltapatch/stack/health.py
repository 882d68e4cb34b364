"""Health of the stack's processes: `status`, and whether the stack (or its MLflow server) runs."""

from __future__ import annotations

import time
from typing import Any

import httpx

from deltapatch.access import prefect_headers
from deltapatch.automations import zombie_automation_state
from deltapatch.faults import fault_settings
from deltapatch.stack import postgres
from deltapatch.stack.auth import stack_credentials, use_credentials
from deltapatch.stack.processes import _http_ok, is_running
from deltapatch.stack.settings import (
    DEPLOYMENTS,
    PROCESS_ORDER,
    process_env,
    read_state,
    stack_dir,
    stack_settings,
    urls,
)


def _health(params: dict[str, Any], name: str, state: dict[str, Any]) -> tuple[bool, str]:
    """(healthy, detail) of one process."""
    settings = stack_settings(params)
    u = urls(params)
    entry = state.get("processes", {}).get(name)
    if not entry or not is_running(entry):
        return False, "not running"
    try:
        if name == "postgres":
            cluster = postgres.cluster(params, settings)
            return postgres.healthy(cluster), f"PostgreSQL on {cluster.host}:{cluster.port} ({cluster.data})"
        if name == "prefect":
            return (_http_ok(u["prefect_api_url"] + "/health"), u["prefect_url"])
        if name == "mlflow":
            return (_http_ok(u["mlflow_url"] + "/health"), u["mlflow_url"])
        if name == "serve":
            return (_http_ok(u["serve_url"] + "/health") or _http_ok(u["serve_url"] + "/docs"), u["serve_url"])
        if name == "worker":
            r = httpx.post(f"{u['prefect_api_url']}/work_pools/{settings.gpu_pool}/workers/filter", json={}, timeout=3,
                           headers=prefect_headers())
            online = [w["name"] for w in (r.json() if r.status_code == 200 else []) if w.get("status") == "ONLINE"]
            return bool(online), f"pool '{settings.gpu_pool}': {len(online)} online worker(s)"
        if name == "deployments":
            names = DEPLOYMENTS
            found = []
            for dep in names:
                r = httpx.get(f"{u['prefect_api_url']}/deployments/name/{dep}", timeout=3, headers=prefect_headers())
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
    use_credentials(params)  # the checks below log in where the stack has credentials
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
    if out["processes"].get("prefect", {}).get("healthy"):
        out["automations"] = {"zombie": _zombie_guard_state(params)}
    return out


def _zombie_guard_state(params: dict[str, Any]) -> dict[str, Any]:
    healthy, detail = zombie_automation_state(urls(params)["prefect_api_url"], fault_settings(params))
    return {"healthy": healthy, "detail": detail}


def mlflow_running(params: dict[str, Any]) -> bool:
    """The stack's MLflow server (which holds the registry files open) is running."""
    entry = (read_state(params) or {}).get("processes", {}).get("mlflow")
    return bool(entry) and is_running(entry)


def client_env(params: dict[str, Any]) -> dict[str, str] | None:
    """PREFECT_API_URL/PREFECT_HOME/MLFLOW_TRACKING_URI of the running stack (and its credentials'
    client variables when it has any), None when it is down."""
    state = read_state(params)
    if not state or not any(is_running(e) for e in state.get("processes", {}).values()):
        return None
    env = process_env(params, state)
    keys = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI")
    credentials = stack_credentials(params)
    return {k: env[k] for k in keys} | (credentials.client_env() if credentials else {})

