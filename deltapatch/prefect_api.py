"""The few Prefect REST calls made outside flows (announce an arrival, find the runs it started).

Every call names the server it talks to. Why: a process can hold Prefect settings for another
server (a profile, a test harness, a `temporary_settings` block), and Prefect's global events worker
keeps sending to the URL it started with. An arrival announced to the wrong server is lost
silently: that is how one of two simultaneous arrivals once never started a run. Events are posted
with ``POST /events``, whose 204 says the server took them, rather than through that background
worker.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import httpx

from deltapatch.access import prefect_headers
from deltapatch.errors import DeltapatchError
from deltapatch.stack import client_env
from deltapatch.stack.auth import use_credentials

HTTP_TIMEOUT = 10.0


def api_url_for(params: dict[str, Any]) -> str:
    """The Prefect API of this project: its running stack, else ``PREFECT_API_URL`` (env or profile)."""
    env = client_env(params)
    if env is not None:
        use_credentials(params)  # the calls that follow log in where the stack has credentials
        return env["PREFECT_API_URL"]
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        # Importing prefect reads its settings from the environment; this module is imported before
        # callers point the environment at the stack (demo.use_stack), and prefect costs seconds.
        from prefect.settings import PREFECT_API_URL  # lazy: prefect reads env at import

        url = PREFECT_API_URL.value()
    if not url:
        raise DeltapatchError(
            "no Prefect server to announce the dataset to (no stack is running for this project and "
            "PREFECT_API_URL is unset): start one with `deltapatch stack up`, set PREFECT_API_URL, or run "
            "the pipeline here with `deltapatch run PATH`"
        )
    return str(url).rstrip("/")


def send_event(api_url: str, event: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
    """Post one event; returns its id once the server has accepted it."""
    from prefect.events.schemas.events import (  # lazy: prefect reads env at import (see api_url_for)
        Event,
        Resource,
    )

    body = Event(event=event, resource=Resource.model_validate(resource), payload=payload, id=uuid.uuid4())
    try:
        response = httpx.post(f"{api_url}/events", json=[body.model_dump(mode="json")], timeout=HTTP_TIMEOUT,
                              headers=prefect_headers())
    except httpx.HTTPError as exc:
        raise DeltapatchError(f"could not reach the Prefect API at {api_url} to emit '{event}': {exc}") from exc
    if response.status_code >= 400:
        raise DeltapatchError(f"the Prefect API at {api_url} refused the event '{event}': "
                              f"HTTP {response.status_code} {response.text[:200]}")
    return str(body.id)


def deployment_id(api_url: str, name: str) -> str:
    """Id of deployment ``flow/deployment``; a clear error when the server does not have it."""
    response = httpx.get(f"{api_url}/deployments/name/{name}", timeout=HTTP_TIMEOUT, headers=prefect_headers())
    if response.status_code == 404:
        raise DeltapatchError(f"the Prefect server at {api_url} has no deployment '{name}': start the "
                              "project's stack (`deltapatch stack up`) or serve the flows (`python -m flows.serve`)")
    response.raise_for_status()
    return str(response.json()["id"])


def flow_runs(api_url: str, deployment: str, limit: int = 200) -> list[dict[str, Any]]:
    """Flow runs of the deployment with id `deployment`, newest expected start first."""
    body = {"flow_runs": {"deployment_id": {"any_": [deployment]}}, "limit": limit, "sort": "EXPECTED_START_TIME_DESC"}
    response = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=HTTP_TIMEOUT, headers=prefect_headers())
    response.raise_for_status()
    return list(response.json())


def runs_by_path(api_url: str, deployment: str) -> dict[str, dict[str, Any]]:
    """The newest flow run of `deployment` (an id) for each value of its ``path`` parameter."""
    runs: dict[str, dict[str, Any]] = {}
    for run in flow_runs(api_url, deployment):
        path = (run.get("parameters") or {}).get("path")
        if path is not None:
            runs.setdefault(str(path), run)
    return runs


def wait_for_run(api_url: str, deployment: str, path: str, wait_s: float, poll_s: float = 1.0) -> dict[str, Any] | None:
    """The run of `deployment` for `path`, once the server has created it; None after `wait_s`.

    A busy server answering with an error counts as "not yet" (the caller decides what to do next).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = runs_by_path(api_url, deployment).get(path)
        except httpx.HTTPError:
            run = None
        if run is not None or time.monotonic() >= deadline:
            return run
        time.sleep(poll_s)
