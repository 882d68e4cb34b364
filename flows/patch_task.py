"""Prefect flows: `patch-task` (a new task arrives → a promoted Δ-patch), `train-patch` (the GPU step,
deployed on the `gpu` work pool) and `rollback-patch`.

The flows only orchestrate: every step is a call into :mod:`deltapatch.pipeline`. Each flow takes
`project` (the project folder; default ``$DELTAPATCH_PROJECT`` or the current folder).

Prefect tasks take and return JSON-able dicts (results may cross machines through result storage);
the flows turn them into the pipeline's typed records (deltapatch/step_results.py) right away.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from deltapatch.telemetry import disable_telemetry

disable_telemetry()  # first: MLflow (imported with deltapatch.pipeline) reads its opt-out when imported

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run, task_run  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from deltapatch import base_versions, faults, pipeline, pool, worker  # noqa: E402
from deltapatch.data.ingest import file_sha256  # noqa: E402
from deltapatch.errors import DatasetError, retryable  # noqa: E402
from deltapatch.gate import GateResult  # noqa: E402
from deltapatch.registry import registry  # noqa: E402
from deltapatch.step_results import Ingested, Registered, TrainedPatch  # noqa: E402


def retry_if_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn` of every retried task: a configuration error, a rejected dataset, a failed
    gate or a fingerprint mismatch fails the same way again (errors.retryable); network and server
    errors, and crashes, are retried."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 — the failed state re-raises its own exception here
        return retryable(exc)
    return True


def training_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Cache key of the training tasks: faults.training_key (task, data content, recipe, base) and the
    project. A finished training is reused — a retried or resubmitted arrival is not trained again."""
    try:
        params = _training_params(parameters.get("project"), parameters.get("base_version"))
        sha = parameters.get("manifest_sha256") or file_sha256(Path(parameters["task_dir"]) / "manifest.csv")
        key = faults.training_key(params, parameters["task_name"], sha, parameters.get("epochs"))
    except Exception:  # noqa: BLE001 — no key (e.g. the data is not here yet): the task runs, uncached
        return None
    project = hashlib.sha256(str(pipeline.project_root(params).resolve()).encode()).hexdigest()[:8]
    return f"deltapatch-{key}-{project}"


def _training_params(project: str | None, base_version: int | None) -> dict[str, Any]:
    """The project's params; with `base_version`, its base: section is that registered base (a rebase
    onto a new base: deltapatch.rebase), fetched from the registry by whichever worker trains."""
    params = pipeline.project_params(project)
    return base_versions.base_params(params, base_version) if base_version else params


TRAIN_DEPLOYMENT = "train-patch/gpu"
NETWORK_RETRIES: dict[str, Any] = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.2,
                       retry_condition_fn=retry_if_retryable)
TRAINING_CACHE: dict[str, Any] = dict(cache_key_fn=training_cache_key, persist_result=True)


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
    return pipeline.ingest_step(pipeline.project_params(project), path, task_name).as_dict()


@task(name="version-data", **NETWORK_RETRIES)
def version_task(project: str | None, ingested: dict[str, Any]) -> dict[str, Any]:
    return pipeline.version_step(pipeline.project_params(project), Ingested.from_dict(ingested)).as_dict()


@task(name="train-delta-patch", task_run_name="train {task_name}", retries=2, retry_delay_seconds=1,
      retry_condition_fn=retry_if_retryable, **TRAINING_CACHE)
def train_task(project: str | None, task_name: str, task_dir: str, data_version: str, manifest_sha256: str | None,
               epochs: int | None = None, attempt: int = 1, base_version: int | None = None) -> dict[str, Any]:
    """Checkpoints every epoch; a retry (here, or a new run of the pool's deployment) resumes from the
    last finished epoch when the checkpoint is reachable, and says so when it is not."""
    params = _training_params(project, base_version)  # on another machine's worker: its own clone
    logger = get_run_logger()
    task_dir = worker.local_task_dir(params, task_name, task_dir)
    if worker.fetch_data_version(params, data_version):
        logger.info("fetched data version %s into this worker's clone (git fetch)", data_version)

    def on_epoch(record: Any) -> None:
        logger.info("epoch %d: loss %.3f, train acc %.3f, val acc %.3f (%.1f s)", record.epoch,
                    record.train_loss, record.train_acc, record.val_acc, record.seconds)

    trained = pipeline.train_step(params, task_name, task_dir, data_version, manifest_sha256=manifest_sha256,
                                  epochs=epochs, on_epoch=on_epoch)
    if trained.resumed_from_epoch:
        logger.info("resumed from the checkpoint after epoch %d (%s)", trained.resumed_from_epoch, trained.checkpoint)
    elif attempt > 1:
        logger.warning("attempt %d started from epoch 1: no checkpoint of the earlier attempt was reachable at %s "
                       "(faults.checkpoint_dir must be a folder every GPU worker reaches)", attempt, trained.checkpoint)
    trained.flow_run_id = str(flow_run.id or "")
    trained.attempt = attempt
    return trained.as_dict()


@task(name="train-on-gpu-pool", task_run_name="train {task_name} on the gpu pool", **TRAINING_CACHE)
def train_on_pool_task(project: str | None, task_name: str, task_dir: str, data_version: str,
                       manifest_sha256: str, epochs: int | None = None, base_version: int | None = None) -> dict[str, Any]:
    """Run the `train-patch/gpu` deployment and wait (bounded); a crashed run is followed by a new one
    that resumes from the checkpoint (deltapatch.pool). Returns the training result with ``attempts``."""
    logger = get_run_logger()
    params = pipeline.project_params(project)
    done = pool.train_on_pool(params, TRAIN_DEPLOYMENT,
                              dict(project=project, task_name=task_name, task_dir=task_dir, data_version=data_version,
                                   manifest_sha256=manifest_sha256, epochs=epochs,
                                   **({"base_version": base_version} if base_version else {})),
                              say=logger.info, warn=logger.warning,
                              idempotency_prefix=f"{task_run.id}:{task_run.run_count}")
    return {**done.trained, "attempts": [a.as_dict() for a in done.attempts]}


@task(name="non-regression-gate", task_run_name="gate {task_name}")
def gate_task(project: str | None, task_name: str, trained: dict[str, Any]) -> dict[str, Any]:
    params = pipeline.project_params(project)
    logger = get_run_logger()
    patch_dir = pipeline.materialise_patch(params, TrainedPatch.from_dict(trained))
    result = pipeline.gate_step(params, task_name, patch_dir, say=logger.warning)
    logger.info(result.message)
    return result.as_dict()


# The registry steps ride out an MLflow restart themselves (faults.outage_window_s, pipeline.ride_out).
@task(name="register-in-mlflow")
def register_task(project: str | None, trained: dict[str, Any], gate: dict[str, Any], data_version: str) -> dict[str, Any]:
    return pipeline.register_step(pipeline.project_params(project), TrainedPatch.from_dict(trained),
                                  GateResult.from_dict(gate), data_version, say=get_run_logger().warning).as_dict()


@task(name="promote")
def promote_task(project: str | None, task_name: str, version: str) -> dict[str, Any]:
    return pipeline.promote_step(pipeline.project_params(project), task_name, version, say=get_run_logger().warning)


# ------------------------------------------------------------------------------------------- flows


def _train_run_name() -> str:
    """``train-<task>``, then ``train-<task>-attempt-N`` (the name the parent submitted it under: a plain
    ``train-{task_name}`` template would rename every attempt back to the first one's name)."""
    params = flow_run.parameters or {}
    return pool.run_name(str(params.get("task_name") or "task"), int(params.get("attempt") or 1))


@flow(name="train-patch", flow_run_name=_train_run_name, persist_result=True)
def train_patch_flow(task_name: str, task_dir: str, data_version: str = "", manifest_sha256: str = "",
                     epochs: int | None = None, project: str | None = None, attempt: int = 1,
                     base_version: int | None = None) -> dict[str, Any]:
    """The GPU step: train one Δ-patch (device auto: CUDA + AMP when present, else CPU). `attempt` > 1:
    a new run after a crashed one (its parent counts them), which resumes from the checkpoint.
    `base_version`: train on that registered base instead of the project's (a rebase)."""
    return train_task(project, task_name, task_dir, data_version, manifest_sha256 or None, epochs, attempt, base_version)


def _run_name() -> str:
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
        ingested = Ingested.from_dict(ingest_task(project, path, task_name))
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


def _after_ingest(path: str, project: str | None, train_on: str, epochs: int | None, ingested: Ingested,
                  started: float) -> dict[str, Any]:
    logger = get_run_logger()
    name = ingested.task
    logger.info("ingested '%s' (%s): data version %s", name, ingested.status, ingested.data_version)
    version_task(project, ingested.as_dict())
    args = (project, name, ingested.task_dir, ingested.data_version, ingested.manifest_sha256, epochs)
    use_pool = train_on == "pool" or (train_on == "auto" and pool.pool_available(pipeline.project_params(project),
                                                                                 TRAIN_DEPLOYMENT))
    if use_pool:
        state = train_on_pool_task(*args, return_state=True)
        trained = TrainedPatch.from_dict(state.result())
        reused = state.name == "Cached"  # a finished training of the same key: not run again
    else:
        state = train_patch_flow(task_name=name, task_dir=ingested.task_dir, data_version=ingested.data_version,
                                 manifest_sha256=ingested.manifest_sha256, epochs=epochs, project=project,
                                 return_state=True)
        trained = TrainedPatch.from_dict(state.result())
        reused = trained.flow_run_id != str(state.state_details.flow_run_id)  # its training task was cached
    attempts = [] if reused else [pool.TrainingAttempt(**a) for a in trained.attempts]
    training = pool.training_note(trained, attempts, reused)
    logger.info("trained on %s: patch accuracy %.3f. %s", trained.device, trained.patch_acc, training.splitlines()[0])
    preface = f"{training}\n\n"
    if ingested.status == "unchanged":
        again = "its finished training was reused" if reused else "the patch was retrained on it"
        preface = (f"The dataset is an exact duplicate of this task's data version {ingested.data_version}: "
                   f"nothing new was versioned, {again}.\n\n{preface}")
    # The gate → register → promote sequence is pipeline.finish; each step runs as this flow's task.
    steps = pipeline.FinishSteps(
        gate=lambda task_name, patch: GateResult.from_dict(gate_task(project, task_name, patch.as_dict())),
        register=lambda patch, gate, data_version: Registered.from_dict(
            register_task(project, patch.as_dict(), gate.as_dict(), data_version)),
        promote=lambda task_name, version: promote_task(project, task_name, version),
    )

    def report(outcome: pipeline.PipelineOutcome) -> None:
        create_markdown_artifact(key=pipeline.artifact_key(name), markdown=pipeline.summary_markdown(outcome),
                                 description=f"Δ-patch {name}: {outcome.status}")

    outcome = pipeline.finish(pipeline.project_params(project), ingested, trained, started, steps=steps,
                              preface=preface, report=report)
    result = outcome.as_dict()
    result["device"] = trained.device
    result["resumed_from_epoch"] = trained.resumed_from_epoch
    result["training_reused"] = reused
    result["training_attempts"] = [a.as_dict() for a in attempts]
    return result


@flow(name="rollback-patch", flow_run_name="rollback-{task_name}")
def rollback_patch_flow(task_name: str, to: str | None = None, reason: str = "", project: str | None = None) -> dict[str, Any]:
    """Point the task's serving alias back at an earlier version (default: the previous champion)."""
    params = pipeline.project_params(project)
    from_version, to_version = registry.rollback(params, task_name, to=to, reason=reason or "rollback-patch flow")
    get_run_logger().info("rolled back %s: champion v%s → v%s", task_name, from_version, to_version)
    return {"task": task_name, "from_version": from_version, "to_version": to_version}
