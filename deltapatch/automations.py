"""The stack's Prefect automation that crashes zombie training runs.

A process worker that dies (its machine lost, the process killed) leaves its flow run ``Running`` on
the server forever: nothing is left to report its end. Prefect's answer for self-hosted servers
("detect zombie flows"): flow runs send ``prefect.flow-run.heartbeat`` events, and a *proactive*
automation marks a run ``Crashed`` when no heartbeat (or end state) follows the last heartbeat within
a window. This module builds that automation for the runs tagged :data:`HEARTBEAT_TAG` (the training
deployment's runs, whose heartbeats :func:`deltapatch.faults.training_run_env` switches on) and
keeps exactly one, as specified, on a server: :func:`ensure_zombie_automation` is what `stack up`
calls, so a missing, edited or disabled automation is repaired like a stopped process.

Every call names the Prefect API it talks to (see :mod:`deltapatch.prefect_api` for why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from deltapatch.access import prefect_headers
from deltapatch.errors import DeltapatchError
from deltapatch.faults import FaultSettings

ZOMBIE_AUTOMATION = "deltapatch: crash zombie training runs"
HEARTBEAT_TAG = "deltapatch-heartbeat"  # runs with this tag send heartbeats; the automation watches them
HTTP_TIMEOUT = 10.0


@dataclass
class AutomationStatus:
    """What :func:`ensure_zombie_automation` found and did: ``created``, ``updated`` or ``ok``."""

    action: str
    automation_id: str
    detail: str


def zombie_automation(settings: FaultSettings) -> Any:
    """Prefect's documented zombie-flow automation, limited to runs tagged :data:`HEARTBEAT_TAG`:
    after a heartbeat (or the run going Running), expect another heartbeat or an end state within
    ``zombie_after_seconds``, per flow run; otherwise change that run's state to Crashed."""
    # prefect's event schemas cost ~1 s of import; `stack status`/`down` never build the automation.
    from prefect.client.schemas.objects import StateType  # lazy: ~1 s of import, see above
    from prefect.events.actions import ChangeFlowRunState  # lazy: ~1 s of import, see above
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture  # lazy: as above

    window = int(settings.zombie_after_seconds)
    trigger = EventTrigger(
        # Armed by Running too, not only by a heartbeat: a run killed before its first heartbeat reached
        # the server (seen in a drill: killed ~10 s after Running) would otherwise stay Running forever.
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        match={"prefect.resource.id": ["prefect.flow-run.*"]},
        match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{HEARTBEAT_TAG}"},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=window),
    )
    action = ChangeFlowRunState(
        state=StateType.CRASHED,
        message=f"no heartbeat for {window} s: its worker died or lost the network (deltapatch zombie automation; "
                "the parent flow starts a new training run, which resumes from the last epoch checkpoint)",
    )
    return AutomationCore(
        name=ZOMBIE_AUTOMATION, enabled=True, trigger=trigger, actions=[action],
        description=f"Marks a training run (tag {HEARTBEAT_TAG}) Crashed after {window} s without a heartbeat. "
                    "Created and repaired by `deltapatch stack up` (params.yaml faults:).",
    )


def _comparable(automation: Any) -> Any:
    """What makes two automations the same (trigger, actions, enabled), lists sorted: the server
    returns the trigger's sets as lists in any order."""
    from prefect.events.schemas.automations import AutomationCore  # lazy: as in zombie_automation

    core = automation if isinstance(automation, AutomationCore) else AutomationCore.model_validate(automation)
    return _sorted(core.model_dump(mode="json", include={"trigger", "actions", "enabled"}))


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        items = [_sorted(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    return value


def _request(method: str, url: str, body: Any = None) -> httpx.Response:
    try:
        response = httpx.request(method, url, json=body, timeout=HTTP_TIMEOUT, headers=prefect_headers())
    except httpx.HTTPError as exc:
        raise DeltapatchError(f"could not reach the Prefect API at {url.split('/automations')[0]}: {exc}") from exc
    if response.status_code >= 400:
        raise DeltapatchError(f"the Prefect API refused {method} {url}: HTTP {response.status_code} "
                              f"{response.text[:300]}")
    return response


def find_automations(api_url: str, name: str = ZOMBIE_AUTOMATION) -> list[dict[str, Any]]:
    """The automations called `name` on the server at `api_url`."""
    body = {"automations": {"name": {"any_": [name]}}, "limit": 50}
    found = _request("POST", f"{api_url}/automations/filter", body).json()
    return [a for a in found if a.get("name") == name]


def ensure_zombie_automation(api_url: str, settings: FaultSettings) -> AutomationStatus:
    """Exactly one zombie automation, as :func:`zombie_automation` specifies, enabled: create it when
    missing, rewrite it when it differs (edited, disabled, other windows), delete duplicates."""
    wanted = zombie_automation(settings)
    payload = wanted.model_dump(mode="json")
    found = find_automations(api_url)
    for extra in found[1:]:
        _request("DELETE", f"{api_url}/automations/{extra['id']}")
    window = f"{settings.zombie_after_seconds} s"
    if not found:
        created = _request("POST", f"{api_url}/automations/", payload).json()
        return AutomationStatus("created", str(created["id"]), f"crashes training runs silent for {window}")
    current = found[0]
    if _comparable(current) == _comparable(wanted):
        return AutomationStatus("ok", str(current["id"]), f"crashes training runs silent for {window}")
    # An update carries no owner_resource (the server refuses it: HTTP 422 extra_forbidden).
    update = {k: v for k, v in payload.items() if k != "owner_resource"}
    _request("PUT", f"{api_url}/automations/{current['id']}", update)
    return AutomationStatus("updated", str(current["id"]), f"was edited or disabled; restored ({window})")


def zombie_automation_state(api_url: str, settings: FaultSettings) -> tuple[bool, str]:
    """(as specified and enabled, detail) — for `stack status` and `doctor`."""
    try:
        found = find_automations(api_url)
    except DeltapatchError as exc:
        return False, str(exc)
    if not found:
        return False, "missing: `deltapatch stack up` creates it"
    current = found[0]
    if not current.get("enabled"):
        return False, "disabled: `deltapatch stack up` enables it again"
    if _comparable(current) != _comparable(zombie_automation(settings)):
        return False, "differs from params.yaml faults: `deltapatch stack up` rewrites it"
    return True, f"crashes training runs silent for {settings.zombie_after_seconds} s"
