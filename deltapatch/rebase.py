"""Rebasing every served patch onto a new base: the steps of `deltapatch base upgrade` (flows/rebase.py
runs them as a Prefect flow; :func:`rebase` chains them in this process).

    base_gate → plan → (per task) train on the task's registered data version with the new base
              → gate_rebased → register (pipeline.register_step) → record → decide (ONE switch)

- **Base gate**: the new base's accuracy on the base evaluation set must reach the current base's
  minus ``gate.base_upgrade_tolerance``; refused → nothing is trained.
- **Per task**: training uses the exact data version of the champion it replaces
  (:func:`deltapatch.data.task_data.task_data_at`: an export from DVC when the task's folder changed
  since); the gate is the patch-task gate run against the new base (base route bit-identical to it,
  no interference with the other rebased patches) plus ``rebase_accuracy``: test accuracy ≥ the old
  champion's − ``gate.rebase_tolerance``. The registered version carries the new base's version and
  fingerprint (register_step registers whatever base the params name).
- **Order**: each task is gated and registered as soon as its training is done, against the new base
  and the patches rebased before it (every pair is checked once: :func:`finish_one`).
- **Resumable**: a task whose rebased version (same data version, new base, gate passed) is already
  registered is not trained again (:func:`already_rebased`).
- **Decide**: every task passed → :func:`deltapatch.base_versions.put_in_service` (one switch).
  Otherwise nothing moves and :class:`RebaseRefused` names the tasks, unless `allow_partial`: then the
  failed tasks are listed as unavailable and the decision is recorded on the base version.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltapatch import base_versions, pipeline
from deltapatch.data.dataset import load_task_dir
from deltapatch.data.ingest import file_sha256
from deltapatch.data.task_data import compact_manifest_prefix, export_task, recorded_manifest, task_data_at
from deltapatch.data.versioning import tasks_dir
from deltapatch.gate import ACC_EPSILON, Champion, GateCheck, GateResult, gate_settings, run_gate
from deltapatch.rebase_records import (
    BaseGate,
    RebaseJob,
    RebaseOutcome,
    RebaseRefused,
    RebaseReport,
    fmt_acc,
    report_markdown,
    timing_line,
)
from deltapatch.registry import base_switch, bases
from deltapatch.registry.reading import download_patch, list_patches
from deltapatch.step_results import Registered, TrainedPatch

T_REBASED_FROM = "rebased_from"  # patch version tag: the champion version it was rebased from


def base_gate(params: dict[str, Any], new_version: int) -> BaseGate:
    """Compare the new base's registered base-task accuracy with the current base's (adopting the
    project's base as the current one when no base is in service yet)."""
    current = base_versions.adopt(params)
    new = bases.get_base(params, new_version)
    if new.version == current.version:
        raise RebaseRefused(f"base v{new.version} is already in service; nothing to upgrade")
    if new.base_acc is None or current.base_acc is None:
        raise RebaseRefused(f"base v{new.version} or v{current.version} has no base_acc tag",
                            hint="register bases with `deltapatch base upgrade WEIGHTS` (it measures them)")
    return BaseGate(new.version, new.base_acc, current.version, current.base_acc,
                    float(gate_settings(params).base_upgrade_tolerance))


def manifest_sha_of(params: dict[str, Any], task: str, data_version: str) -> str:
    """The full sha256 of `task`'s manifest at `data_version` (compact form ends with its first 12 hex):
    from the working copy when it still holds it, else the ingest commit's trailer, else an export."""
    marker = compact_manifest_prefix(data_version)
    manifest = tasks_dir(params) / task / "manifest.csv"
    if manifest.is_file() and marker:
        sha = file_sha256(manifest)
        if sha.startswith(marker):
            return sha
    _, recorded = recorded_manifest(params, task, data_version)
    if len(recorded) == 64 and recorded.startswith(marker):  # the ingest commit's trailer: the full sha
        return recorded
    with tempfile.TemporaryDirectory(prefix=f"deltapatch-{task}-") as tmp:
        return export_task(params, data_version, task, Path(tmp) / task)


def plan(params: dict[str, Any]) -> list[RebaseJob]:
    """One job per task served with the current base (its champion and that champion's data version)."""
    jobs = []
    for task, info in sorted(bases.serving_set(params).tasks.items()):
        data_version = str(info.get("data_version") or "")
        if not data_version:
            raise RebaseRefused(f"'{task}' v{info['version']} records no data version: cannot retrain it on its data",
                                hint=f"retrain it with `deltapatch run` first, or roll it back (`deltapatch patches list --task {task}`)")
        jobs.append(RebaseJob(task, int(info["version"]), info.get("patch_acc"), data_version,
                              manifest_sha_of(params, task, data_version)))
    return jobs


def already_rebased(params: dict[str, Any], job: RebaseJob, new_base: bases.BaseVersion) -> dict[str, Any] | None:
    """A gate-passed version of `job.task` on `new_base`, from `job.data_version`, rebased from the same
    champion (an earlier, interrupted run of the rebase registered it), or None."""
    for info in list_patches(params, job.task):
        if (info["base_fingerprint"] == new_base.fingerprint and info["data_version"] == job.data_version
                and info["gate"] == "passed" and info["registration"] == "complete"
                and info["tags"].get(T_REBASED_FROM) == str(job.old_version)):
            return info
    return None


def data_dir(params: dict[str, Any], job: RebaseJob) -> Path:
    """The task's folder at its registered data version (exported by DVC when the working copy changed)."""
    return task_data_at(params, job.task, job.data_version, job.manifest_sha256)


def gate_rebased(new_params: dict[str, Any], job: RebaseJob, patch_dir: Path, others: list[Champion]) -> GateResult:
    """The patch-task gate against the new base and the other rebased patches, on the registered data,
    plus ``rebase_accuracy`` (≥ the old champion's accuracy − gate.rebase_tolerance)."""
    test_data = load_task_dir(data_dir(new_params, job), int(new_params["base"]["input_size"]), name=job.task)
    result = run_gate(new_params, None, job.task, patch_dir, others, test_data=test_data)
    acc = result.check("patch_accuracy").value  # type: ignore[union-attr]  # run_gate always adds it
    tol = float(gate_settings(new_params).rebase_tolerance)
    old = float("nan") if job.old_acc is None else float(job.old_acc)
    need = (old - tol) if not math.isnan(old) else 0.0
    ok = acc >= need - ACC_EPSILON
    detail = (f"rebase_accuracy {acc:.3f} {'≥' if ok else '<'} old champion v{job.old_version} {old:.3f} − "
              f"gate.rebase_tolerance {tol:g}" + ("" if ok else f" (short by {need - acc:.3f})"))
    result.checks.append(GateCheck("rebase_accuracy", ok, acc, need, detail, {"old_acc": old}))
    return result


def record(params: dict[str, Any], new_base: int, job: RebaseJob, registered: Registered,
           gate: GateResult, trained: TrainedPatch, seconds: float) -> RebaseOutcome:
    """Link the rebased version to its origin (tags on both) and describe it."""
    client = bases._client(params)
    name = bases.registry_settings(params).model_name(job.task)
    client.set_model_version_tag(name, registered.version, T_REBASED_FROM, str(job.old_version))
    acc = float(trained.metrics["patch_acc"])
    verdict = "gate passed" if gate.passed else "GATE FAILED: " + "; ".join(c.detail for c in gate.failed)
    base_switch.link_rebased(params, new_base, job.task,
                       f"v{job.old_version} → v{registered.version}: {verdict} ({fmt_acc(job.old_acc)} → {acc:.3f})")
    return RebaseOutcome(job.task, job.old_version, job.old_acc, registered.version, acc, gate.passed,
                         gate.message, False, job.manifest_sha256, seconds, float(trained.wall_seconds))


def reused_outcome(job: RebaseJob, info: dict[str, Any]) -> RebaseOutcome:
    return RebaseOutcome(job.task, job.old_version, job.old_acc, str(info["version"]), info.get("patch_acc"), True,
                         "registered by an earlier run of this rebase (gate passed)", True, job.manifest_sha256)


def decide(params: dict[str, Any], gate: BaseGate, outcomes: list[RebaseOutcome], allow_partial: bool) -> bases.SwitchRecord:
    """Switch to the new base with every rebased patch (one switch), or refuse naming the failed tasks."""
    failed = [o for o in outcomes if not o.passed]
    if failed and not allow_partial:
        names = ", ".join(f"{o.task} ({o.detail})" for o in failed)
        raise RebaseRefused(f"{len(failed)} task(s) failed their rebase gate, no switch; base v{gate.current_version} "
                            f"and its patches stay in service: {names}",
                            hint="fix or retrain those tasks, raise gate.rebase_tolerance, or re-run with --allow-partial")
    tasks = {o.task: int(o.new_version) for o in outcomes if o.passed}
    unavailable = {o.task: f"not rebased onto base v{gate.new_version}: {o.detail}" for o in failed}
    note = (f"--allow-partial: switched without {sorted(unavailable)} (unavailable until retrained on this base)"
            if failed else "")
    return base_versions.put_in_service(params, gate.new_version, tasks, unavailable,
                                        reason=f"base upgrade from v{gate.current_version}", note=note)


Train = Callable[[dict[str, Any], RebaseJob, Path], TrainedPatch]


def local_train(new_params: dict[str, Any], job: RebaseJob, folder: Path, epochs: int | None = None) -> TrainedPatch:
    return pipeline.train_step(new_params, job.task, folder, job.data_version, manifest_sha256=job.manifest_sha256,
                               epochs=epochs)


@dataclass
class Rebased:
    """The patches rebased so far, task → (patch folder, test accuracy, version, data version): each later
    gate checks that they still reproduce their accuracy beside it."""

    dirs: dict[str, tuple[Path, float, str, str]] = field(default_factory=dict)

    def champions(self, exclude: str) -> list[Champion]:
        return [Champion(t, v, d, acc, dv) for t, (d, acc, v, dv) in self.dirs.items() if t != exclude]


def finish_one(params: dict[str, Any], new_params: dict[str, Any], new_version: int, job: RebaseJob,
               trained: TrainedPatch, seconds: float, rebased: Rebased) -> RebaseOutcome:
    """Gate one newly trained patch against the new base and the patches rebased before it, register it.
    Gating the tasks one after the other covers every pair: the gate of each checks that the earlier
    ones still reproduce their accuracy beside it (as `patch-task` gates a new task)."""
    patch_dir = pipeline.materialise_patch(new_params, trained)
    gate = gate_rebased(new_params, job, patch_dir, rebased.champions(job.task))
    registered = pipeline.register_step(new_params, trained, gate, job.data_version)
    outcome = record(params, new_version, job, registered, gate, trained, seconds)
    if outcome.passed:
        rebased.dirs[job.task] = (patch_dir, float(trained.metrics["patch_acc"]), outcome.new_version, job.data_version)
    return outcome


def reuse_one(params: dict[str, Any], job: RebaseJob, info: dict[str, Any], rebased: Rebased, dst: Path) -> RebaseOutcome:
    """A task an earlier run rebased: its registered patch joins the interference references."""
    folder = download_patch(params, job.task, version=info["version"], dst=dst / job.task)
    acc = float("nan") if info.get("patch_acc") is None else float(info["patch_acc"])
    rebased.dirs[job.task] = (folder, acc, str(info["version"]), job.data_version)
    return reused_outcome(job, info)


def rebase(params: dict[str, Any], new_version: int, *, allow_partial: bool = False, epochs: int | None = None,
           train: Train | None = None, say: Callable[[str], None] = print) -> RebaseReport:
    """Every step in this process (the Python API; flows/rebase.py is the orchestrated form)."""
    gate = base_gate(params, new_version)
    say(gate.message)
    if not gate.passed:
        raise RebaseRefused(gate.message + "; nothing was trained",
                            hint="train a better base, or raise gate.base_upgrade_tolerance")
    new_base = bases.get_base(params, new_version)
    new_params = base_versions.base_params(params, new_version)
    train = train or (lambda p, j, f: local_train(p, j, f, epochs))
    rebased, outcomes = Rebased(), []
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deltapatch-rebase-") as tmp:
        for job in plan(params):
            done = already_rebased(params, job, new_base)
            if done is not None:
                outcomes.append(reuse_one(params, job, done, rebased, Path(tmp)))
                continue
            started = time.perf_counter()
            patch = train(new_params, job, data_dir(params, job))
            outcomes.append(finish_one(params, new_params, new_version, job, patch, time.perf_counter() - started,
                                       rebased))
            say(f"{job.task}: {outcomes[-1].detail}")
        switch = decide(params, gate, outcomes, allow_partial)
    return RebaseReport(gate.as_dict(), [o.as_dict() for o in outcomes], switch.as_dict(),
                        report_markdown(gate, outcomes, switch, timing_line(time.perf_counter() - started_all, outcomes)))


__all__ = ["BaseGate", "RebaseJob", "RebaseOutcome", "RebaseRefused", "RebaseReport", "Rebased", "already_rebased",
           "base_gate", "data_dir", "decide", "finish_one", "gate_rebased", "local_train", "manifest_sha_of", "plan",
           "rebase", "record", "report_markdown", "reuse_one", "reused_outcome", "timing_line"]
