"""Deployments of the flows.

- ``patch-task/patch-task``: served (by ``flows.serve``), started by a ``DeploymentEventTrigger`` on
  the event ``deltapatch.task.arrived``, with ``task_name`` and ``path`` templated from the event.
- ``rollback-patch/rollback-patch``: served, run on demand.
- ``rebase-patches/rebase-patches`` and ``rollback-base/rollback-base``: served, run on demand
  (``deltapatch base upgrade|rollback``; flows/rebase.py).
- ``train-patch/gpu``: on the work pool ``gpu`` (type process; concurrency = one run per GPU), built
  with ``flow.from_source(<code folder>, "flows/patch_task.py:train_patch_flow").deploy(...)`` and
  picked up by ``deltapatch worker start`` (``prefect worker start --pool gpu`` with the environment a
  training run needs) on each GPU machine. Its pull step enters the code folder of the machine that
  deployed it: a GPU machine keeps its checkout of the code at the same path. Its runs carry the tag
  ``deltapatch-heartbeat`` and, through the deployment's job variables, the environment of
  :func:`deltapatch.faults.training_run_env` (heartbeats on): whichever worker runs them, the stack's
  zombie automation (:mod:`deltapatch.automations`) sees a dead one within ``faults.zombie_after_seconds``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltapatch.telemetry import disable_telemetry

disable_telemetry()  # first: Prefect and MLflow read their opt-outs when imported (as in flows.patch_task)

import torch  # noqa: E402
from prefect import Flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate  # noqa: E402
from prefect.events import DeploymentEventTrigger  # noqa: E402
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound  # noqa: E402

from deltapatch.automations import HEARTBEAT_TAG  # noqa: E402
from deltapatch.config import load_params  # noqa: E402
from deltapatch.faults import training_run_env  # noqa: E402
from deltapatch.inbox import ARRIVED_EVENT, TASK_NAME_LABEL, TASK_RESOURCE_PREFIX  # noqa: E402
from flows.patch_task import patch_task_flow, rollback_patch_flow, train_patch_flow  # noqa: E402
from flows.rebase import rebase_patches_flow, rollback_base_flow  # noqa: E402

TRAIN_DEPLOYMENT_NAME = "gpu"


def arrival_trigger() -> Any:
    """The trigger that starts `patch-task` for each arrival event (one run per event)."""
    return DeploymentEventTrigger(
        name="on-task-arrival",
        expect={ARRIVED_EVENT},
        match={"prefect.resource.id": f"{TASK_RESOURCE_PREFIX}*"},
        parameters={
            "task_name": "{{ event.resource['" + TASK_NAME_LABEL + "'] }}",
            "path": "{{ event.payload.path }}",
        },
    )


def pool_concurrency(configured: int) -> int:
    """Configured value, or one run per visible CUDA device (at least 1)."""
    if configured and configured > 0:
        return int(configured)
    try:
        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def ensure_pool(pool: str, concurrency: int) -> None:
    """Create the process work pool if missing and set its concurrency limit."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process", concurrency_limit=concurrency))
            except ObjectAlreadyExists:
                pass
        client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency))


def deploy_training(project: str, pool: str = "gpu", code_root: Path | None = None) -> Any:
    """Register `train-patch/gpu` on the work pool (the worker runs it from the code folder)."""
    source = Path(code_root or Path(__file__).resolve().parent.parent)
    remote = train_patch_flow.from_source(source=str(source), entrypoint="flows/patch_task.py:train_patch_flow")
    assert isinstance(remote, Flow)  # called from sync code, Prefect's sync/async API returns the flow itself
    env = training_run_env(load_params(Path(project)))
    return remote.deploy(name=TRAIN_DEPLOYMENT_NAME, work_pool_name=pool, parameters={"project": project},
                         description="Train one Δ-patch (device auto: CUDA + AMP when present).",
                         tags=["deltapatch", "gpu", HEARTBEAT_TAG], job_variables={"env": env},
                         build=False, push=False, print_next_steps=False)


def served_deployments(project: str) -> list[Any]:
    """`patch-task` (with the arrival trigger) and `rollback-patch`, for `prefect.serve`."""
    patch = patch_task_flow.to_deployment(
        name="patch-task", triggers=[arrival_trigger()], parameters={"project": project, "train_on": "auto"},
        description="New task dataset → ingest, version, train on the gpu pool, gate, register, promote.",
        tags=["deltapatch"],
    )
    rollback = rollback_patch_flow.to_deployment(name="rollback-patch", parameters={"project": project},
                                                 description="Point a task's champion back to an older version.",
                                                 tags=["deltapatch"])
    rebase = rebase_patches_flow.to_deployment(
        name="rebase-patches", parameters={"project": project, "train_on": "auto"},
        description="A new base → every served patch retrained on it (gpu pool), gated, one switch.",
        tags=["deltapatch"])
    rollback_base = rollback_base_flow.to_deployment(name="rollback-base", parameters={"project": project},
                                                     description="The previous base and its patches back in service.",
                                                     tags=["deltapatch"])
    return [patch, rollback, rebase, rollback_base]
