"""Prefect flows: `patch-task` (a new task arrives → a promoted Δ-patch), `train-patch` (the GPU step,
deployed on the `gpu` work pool) and `rollback-patch`.

The flows only orchestrate: every step is a call into :mod:`deltapatch.pipeline`. Each flow takes
`project` (the project folder; default ``$DELTAPATCH_PROJECT`` or the current folder).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deltapatch.telemetry import disable_telemetry

disable_telemetry()  # first: MLflow (imported with deltapatch.pipeline) reads its opt-out when imported

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from deltapatch import pipeline  # noqa: E402
from deltapatch.errors import DatasetError, DeltapatchError, retryable  # noqa: E402
from deltapatch.gate import GateResult  # noqa: E402


def retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` of every retried task: a configuration error, a rejected dataset, a failed
    gate or a fingerprint mismatch fails the same way again (errors.retryable); network and server
    errors, and crashes, are retried."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 — the failed state re-raises its own exception here
        return retryable(exc)
    return True


TRAIN_DEPLOYMENT = "train-patch/gpu"
NETWORK_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
                       retry_condition_fn=retry_if_retryable)


# ------------------------------------------------------------------------------------------- tasks


@task(name="check-base")
def base_task(project: str | None) -> str:
    """Before any data is touched: the base exists (the embedded default is pre-trained now)."""
    return pipeline.base_step(pipeline.project_params(project), say=get_run_logger().info)


@task(name="release-arrival", task_run_name="release {path}")
def release_task(project: str | None, path: str) -> bool:
    return pipeline.release_step(pipeline.project_params(project), path)


@task(name="ingest-and-validate", task_run_name="ingest {path}")
def ingest_task(project: str | None, path: str, task_name: str | None) -> dict[str, Any]:
    return pipeline.ingest_step(pipeline.project_params(project), path, task_name)


@task(name="version-data", **NETWORK_RETRIES)
def version_task(project: str | None, ingested: dict[str, Any]) -> dict[str, Any]:
    return pipeline.version_step(pipeline.project_params(project), ingested)


@task(name="train-delta-patch", task_run_name="train {task_name}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_retryable)
def train_task(project: str | None, task_name: str, task_dir: str, data_version: str, manifest_sha256: str,
               epochs: int | None = None) -> dict[str, Any]:
    """Checkpoints every epoch; a retry resumes from the last finished epoch."""
    params = pipeline.project_params(project)
    logger = get_run_logger()

    def on_epoch(record: Any) -> None:
        logger.info("epoch %d: loss %.3f, train acc %.3f, val acc %.3f (%.1f s)", record.epoch,
                    record.train_loss, record.train_acc, record.val_acc, record.seconds)

    trained = pipeline.train_step(params, task_name, task_dir, data_version, manifest_sha256=manifest_sha256,
                                  epochs=epochs, on_epoch=on_epoch)
    if trained["resumed_from_epoch"]:
        logger.info("resumed from the checkpoint after epoch %d", trained["resumed_from_epoch"])
    return trained


@task(name="train-on-gpu-pool", task_run_name="train {task_name} on the gpu pool", retries=1, retry_delay_seconds=2,
      retry_condition_fn=retry_if_retryable)
def train_on_pool_task(project: str | None, task_name: str, task_dir: str, data_version: str,
                       manifest_sha256: str, epochs: int | None = None) -> dict[str, Any]:
    """Run the `train-patch/gpu` deployment and wait; a retry starts a new run that resumes."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    run = run_deployment(TRAIN_DEPLOYMENT, parameters=dict(project=project, task_name=task_name, task_dir=task_dir,
                                                           data_version=data_version, manifest_sha256=manifest_sha256,
                                                           epochs=epochs),
                         timeout=None, poll_interval=2, flow_run_name=f"train-{task_name}")
    logger.info("training run %s ended %s", run.name, run.state.name if run.state else "?")
    if run.state is not None and run.state.is_failed():
        try:  # the training's own error, when Prefect kept it: a configuration error is not retried
            run.state.result()
        except DeltapatchError:
            raise
        except Exception:  # noqa: BLE001 — not readable here: report the state below (retried)
            pass
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"training run {run.name} ended {run.state.name if run.state else 'without a state'}: "
                           f"{run.state.message if run.state else ''}")
    return run.state.result()


@task(name="non-regression-gate", task_run_name="gate {task_name}")
def gate_task(project: str | None, task_name: str, trained: dict[str, Any]) -> dict[str, Any]:
    params = pipeline.project_params(project)
    patch_dir = pipeline.materialise_patch(params, trained)
    result = pipeline.gate_step(params, task_name, patch_dir)
    get_run_logger().info(result.message)
    return result.as_dict()


@task(name="register-in-mlflow", **NETWORK_RETRIES)
def register_task(project: str | None, trained: dict[str, Any], gate: dict[str, Any], data_version: str) -> dict[str, Any]:
    return pipeline.register_step(pipeline.project_params(project), trained, GateResult.from_dict(gate), data_version)


@task(name="promote", **NETWORK_RETRIES)
def promote_task(project: str | None, task_name: str, version: str) -> dict[str, Any]:
    return pipeline.promote_step(pipeline.project_params(project), task_name, version)


# ------------------------------------------------------------------------------------------- flows


@flow(name="train-patch", flow_run_name="train-{task_name}", persist_result=True)
def train_patch_flow(task_name: str, task_dir: str, data_version: str = "", manifest_sha256: str = "",
                     epochs: int | None = None, project: str | None = None) -> dict[str, Any]:
    """The GPU step: train one Δ-patch (device auto: CUDA + AMP when present, else CPU)."""
    return train_task(project, task_name, task_dir, data_version, manifest_sha256 or None, epochs)


def _pool_available() -> bool:
    """True when the training deployment exists and a worker of its pool is online."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(TRAIN_DEPLOYMENT)
            workers = client.read_workers_for_work_pool(deployment.work_pool_name or "gpu")
    except (ObjectNotFound, Exception):  # no server, ephemeral API, no deployment
        return False
    return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters or {}
    return f"patch-{params.get('task_name') or Path(str(params.get('path', 'task'))).name}"


@flow(name="patch-task", flow_run_name=_run_name, persist_result=True)
def patch_task_flow(path: str, task_name: str | None = None, project: str | None = None,
                    train_on: str = "auto", epochs: int | None = None) -> dict[str, Any]:
    """A new task dataset → validated, versioned, trained, gated, registered and promoted Δ-patch.

    train_on: "pool" (the `train-patch/gpu` deployment on the GPU work pool), "inline" (in this
    process, as a sub-flow) or "auto" (the pool when its deployment and an online worker exist).
    """
    started = time.perf_counter()
    task_name = task_name or None  # the arrival event carries '' when no name was given
    name_for_artifact = task_name or Path(path).name
    base_task(project)  # before anything is ingested: a missing user base leaves the dataset where it is
    try:
        ingested = ingest_task(project, path, task_name)
    except Exception as exc:
        rejected = isinstance(exc, DatasetError)
        create_markdown_artifact(key=pipeline.artifact_key(name_for_artifact),
                                 markdown=f"# Δ-patch `{name_for_artifact}`: ❌ {'rejected' if rejected else 'failed'}"
                                          f"\n\n{exc}\n", description="dataset rejected" if rejected else "ingest failed")
        if rejected:  # quarantined (moved out of the inbox)
            release_task(project, path)
        raise
    try:
        return _after_ingest(path, project, train_on, epochs, ingested, started)
    finally:
        release_task(project, path)  # the data is versioned: the inbox copy is done with


def _after_ingest(path: str, project: str | None, train_on: str, epochs: int | None, ingested: dict[str, Any],
                  started: float) -> dict[str, Any]:
    logger = get_run_logger()
    name = ingested["task"]
    logger.info("ingested '%s' (%s): data version %s", name, ingested["status"], ingested["data_version"])
    version_task(project, ingested)
    args = (project, name, ingested["task_dir"], ingested["data_version"], ingested["manifest_sha256"], epochs)
    use_pool = train_on == "pool" or (train_on == "auto" and _pool_available())
    if use_pool:
        trained = train_on_pool_task(*args)
    else:
        trained = train_patch_flow(task_name=name, task_dir=ingested["task_dir"], data_version=ingested["data_version"],
                                   manifest_sha256=ingested["manifest_sha256"], epochs=epochs, project=project)
    logger.info("trained on %s: patch accuracy %.3f", trained.get("device"), trained["metrics"]["patch_acc"])
    preface = ""
    if ingested["status"] == "unchanged":
        preface = (f"The dataset is an exact duplicate of this task's data version {ingested['data_version']}: "
                   "nothing new was versioned, the patch was retrained on it.\n\n")
    # The gate → register → promote sequence is pipeline.finish; each step runs as this flow's task.
    steps = pipeline.FinishSteps(
        gate=lambda task_name, patch: GateResult.from_dict(gate_task(project, task_name, patch)),
        register=lambda patch, gate, data_version: register_task(project, patch, gate.as_dict(), data_version),
        promote=lambda task_name, version: promote_task(project, task_name, version),
    )

    def report(outcome: pipeline.PipelineOutcome) -> None:
        create_markdown_artifact(key=pipeline.artifact_key(name), markdown=pipeline.summary_markdown(outcome),
                                 description=f"Δ-patch {name}: {outcome.status}")

    outcome = pipeline.finish(pipeline.project_params(project), ingested, trained, started, steps=steps,
                              preface=preface, report=report)
    result = outcome.as_dict()
    result["device"] = trained.get("device")
    result["resumed_from_epoch"] = trained.get("resumed_from_epoch", 0)
    return result


@flow(name="rollback-patch", flow_run_name="rollback-{task_name}")
def rollback_patch_flow(task_name: str, to: str | None = None, reason: str = "", project: str | None = None) -> dict[str, Any]:
    """Point the task's serving alias back at an earlier version (default: the previous champion)."""
    from deltapatch.registry import registry

    params = pipeline.project_params(project)
    from_version, to_version = registry.rollback(params, task_name, to=to, reason=reason or "rollback-patch flow")
    get_run_logger().info("rolled back %s: champion v%s → v%s", task_name, from_version, to_version)
    return {"task": task_name, "from_version": from_version, "to_version": to_version}
