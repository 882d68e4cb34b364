"""Prefect flow `rebase-patches`: every served patch retrained onto a new base, then ONE switch
(`deltapatch base upgrade`; the steps are deltapatch.rebase, this module only orchestrates them).

    base gate → for each task: a `train-patch` flow run (on the `gpu` pool, or in-process) on the new
    base and the champion's data version → gate + register each → decide: switch, or refuse

Each task's training is its own flow run with its own attempts (the pool's, or the training task's
retries); a re-run of `rebase-patches` after a crash skips the tasks already rebased (registered and
gate-passed on the new base: deltapatch.rebase.already_rebased) and reuses finished trainings (the
training cache). The report (one markdown table) is an artifact of the flow run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from deltapatch.telemetry import disable_telemetry

disable_telemetry()  # first: MLflow (imported with deltapatch.pipeline) reads its opt-out when imported

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.futures import as_completed  # noqa: E402

from deltapatch import base_versions, pipeline, pool, rebase  # noqa: E402
from deltapatch.data.versioning import tasks_dir  # noqa: E402
from deltapatch.registry import bases  # noqa: E402
from deltapatch.step_results import TrainedPatch  # noqa: E402
from flows.patch_task import NETWORK_RETRIES, TRAIN_DEPLOYMENT, train_on_pool_task, train_patch_flow  # noqa: E402

ARTIFACT_KEY = "rebase-patches"


@task(name="base-gate", **NETWORK_RETRIES)
def base_gate_task(project: str | None, base_version: int) -> dict[str, Any]:
    return rebase.base_gate(pipeline.project_params(project), base_version).as_dict()


@task(name="plan-rebase", **NETWORK_RETRIES)
def plan_task(project: str | None) -> list[dict[str, Any]]:
    return [job.as_dict() for job in rebase.plan(pipeline.project_params(project))]


@task(name="already-rebased", task_run_name="already rebased {task_name}?", **NETWORK_RETRIES)
def done_task(project: str | None, task_name: str, job: dict[str, Any], base_version: int) -> dict[str, Any] | None:
    params = pipeline.project_params(project)
    return rebase.already_rebased(params, rebase.RebaseJob.from_dict(job), bases.get_base(params, base_version))


def _rebased(dirs: dict[str, list[Any]]) -> rebase.Rebased:
    return rebase.Rebased({t: (Path(d), float(a), str(v), str(dv)) for t, (d, a, v, dv) in dirs.items()})


def _dirs(rebased: rebase.Rebased) -> dict[str, list[Any]]:
    return {t: [str(d), a, v, dv] for t, (d, a, v, dv) in rebased.dirs.items()}


@task(name="gate-and-register-rebased", task_run_name="gate and register {task_name}")
def finish_task(project: str | None, base_version: int, task_name: str, job: dict[str, Any], trained: dict[str, Any],
                seconds: float, dirs: dict[str, list[Any]]) -> dict[str, Any]:
    """Gate the new patch against the new base and the patches rebased before it; register it.
    Returns {"outcome": RebaseOutcome, "dirs": the rebased patches so far}."""
    params = pipeline.project_params(project)
    rebased = _rebased(dirs)
    outcome = rebase.finish_one(params, base_versions.base_params(params, base_version), base_version,
                                rebase.RebaseJob.from_dict(job), TrainedPatch.from_dict(trained), seconds, rebased)
    get_run_logger().info("%s: %s", task_name, outcome.detail)
    return {"outcome": outcome.as_dict(), "dirs": _dirs(rebased)}


@task(name="reuse-rebased", task_run_name="reuse rebased {task_name}")
def reuse_task(project: str | None, task_name: str, job: dict[str, Any], info: dict[str, Any], dst: str,
               dirs: dict[str, list[Any]]) -> dict[str, Any]:
    rebased = _rebased(dirs)
    outcome = rebase.reuse_one(pipeline.project_params(project), rebase.RebaseJob.from_dict(job), info, rebased, Path(dst))
    return {"outcome": outcome.as_dict(), "dirs": _dirs(rebased)}


@task(name="switch-base")
def decide_task(project: str | None, gate: dict[str, Any], outcomes: list[dict[str, Any]], allow_partial: bool) -> dict[str, Any]:
    record = rebase.decide(pipeline.project_params(project), rebase.BaseGate.from_dict(gate),
                           [rebase.RebaseOutcome.from_dict(o) for o in outcomes], allow_partial)
    return record.as_dict()


def _report(gate: rebase.BaseGate, outcomes: list[rebase.RebaseOutcome], switch: dict[str, Any] | None,
            message: str = "") -> None:
    record = bases.SwitchRecord(**switch) if switch else None
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=rebase.report_markdown(gate, outcomes, record, message),
                             description=f"base upgrade to v{gate.new_version}")


@flow(name="rebase-patches", flow_run_name="rebase-onto-base-v{base_version}", persist_result=True)
def rebase_patches_flow(base_version: int, project: str | None = None, allow_partial: bool = False,
                        epochs: int | None = None, train_on: str = "auto") -> dict[str, Any]:
    """Rebase every served patch onto registered base `base_version` and switch once (module doc).

    train_on: "pool" (one `train-patch/gpu` run per task, concurrently up to the pool's limit),
    "inline" (one `train-patch` sub-flow run per task, in turn) or "auto" (the pool when available).
    """
    logger = get_run_logger()
    started = time.perf_counter()
    gate = rebase.BaseGate.from_dict(base_gate_task(project, base_version))
    logger.info(gate.message)
    if not gate.passed:
        _report(gate, [], None, "Nothing was trained.")
        raise rebase.RebaseRefused(gate.message + "; nothing was trained",
                                   hint="train a better base, or raise gate.base_upgrade_tolerance")
    params = pipeline.project_params(project)
    jobs = [rebase.RebaseJob.from_dict(j) for j in plan_task(project)]
    use_pool = train_on == "pool" or (train_on == "auto" and pool.pool_available(params, TRAIN_DEPLOYMENT))
    outcomes: list[rebase.RebaseOutcome] = []
    dirs: dict[str, list[Any]] = {}
    submitted: dict[Any, tuple[rebase.RebaseJob, float]] = {}  # pool future → (job, submission time)

    def finished(step: dict[str, Any]) -> None:
        nonlocal dirs
        outcomes.append(rebase.RebaseOutcome.from_dict(step["outcome"]))
        dirs = step["dirs"]

    with tempfile.TemporaryDirectory(prefix="deltapatch-rebase-") as tmp:
        for job in jobs:
            done = done_task(project, job.task, job.as_dict(), base_version)
            if done is not None:
                logger.info("%s: v%s already rebased by an earlier run; not trained again", job.task, done["version"])
                finished(reuse_task(project, job.task, job.as_dict(), done, tmp, dirs))
                continue
            folder = str(tasks_dir(params) / job.task)  # the training exports the data version when it changed
            t0 = time.perf_counter()
            if use_pool:  # all submitted at once: the pool runs as many as its concurrency allows
                future = train_on_pool_task.submit(
                    project, job.task, folder, job.data_version, job.manifest_sha256, epochs, base_version)
                submitted[future] = (job, t0)
                continue
            trained = train_patch_flow(task_name=job.task, task_dir=folder, data_version=job.data_version,
                                       manifest_sha256=job.manifest_sha256, epochs=epochs, project=project,
                                       base_version=base_version)  # one `train-patch` sub-flow run per task
            finished(finish_task(project, base_version, job.task, job.as_dict(), trained, time.perf_counter() - t0, dirs))
        # Gated and registered in the order the trainings end, so that only the last gate runs after
        # the last training (in submission order, the tasks that finished early waited for the slow
        # ones and were gated at the end: 1.27× the trainings' sum in the demo's upgrade).
        for future in as_completed(list(submitted)):
            job, t0 = submitted[future]
            finished(finish_task(project, base_version, job.task, job.as_dict(), future.result(),
                                 time.perf_counter() - t0, dirs))
    order = {job.task: i for i, job in enumerate(jobs)}
    outcomes.sort(key=lambda o: order[o.task])  # the report lists the tasks in plan order
    try:
        switch = decide_task(project, gate.as_dict(), [o.as_dict() for o in outcomes], allow_partial)
    except rebase.RebaseRefused as exc:
        _report(gate, outcomes, None, f"**No switch**: {exc}")
        raise
    timing = rebase.timing_line(time.perf_counter() - started, outcomes)
    logger.info(timing)
    _report(gate, outcomes, switch, timing)
    return {"gate": gate.as_dict(), "outcomes": [o.as_dict() for o in outcomes], "switch": switch, "timing": timing}


@flow(name="rollback-base", flow_run_name="rollback-base")
def rollback_base_flow(to: int | None = None, reason: str = "", project: str | None = None) -> dict[str, Any]:
    """The previous base (or base `to`) and the patches it served, in one switch."""
    record = base_versions.roll_back(pipeline.project_params(project), to=to, reason=reason or "rollback-base flow")
    get_run_logger().info("base rolled back: v%s → v%s", record.from_version, record.to_version)
    return record.as_dict()
