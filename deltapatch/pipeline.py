"""The steps of the `patch-task` pipeline as plain functions.

The Prefect flows (``flows/patch_task.py``) wrap each step in a task; ``deltapatch run
--no-prefect`` and notebooks call :func:`run_pipeline`, which chains the same functions. Every step
takes the project params and returns a small typed record (deltapatch/step_results.py: Ingested,
Versioned, TrainedPatch, Registered, and the gate's GateResult); the flows turn them into JSON-able
dicts only at the Prefect boundary (the training step runs on the GPU work pool's worker).

    base_step → ingest_step → version_step → train_step → gate_step → register_step → promote_step
    (release_step when the run has ended: the dataset leaves the inbox)

Failure semantics: a missing user base raises ConfigError before anything is ingested (the dataset
stays where it is); a rejected dataset raises :class:`~deltapatch.errors.DatasetError` (input
quarantined, nothing registered); a failed gate registers the version as *failed* (tagged, never
promoted) and raises :class:`~deltapatch.errors.GateFailed` naming the check and the margin.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltapatch.config import load_params, project_root, section, state_dir
from deltapatch.data.dataset import load_task_dir
from deltapatch.data.ingest import file_sha256, ingest, quarantine
from deltapatch.data.task_data import task_data_at
from deltapatch.data.versioning import VersioningError, push_data, tasks_dir
from deltapatch.delta.patch import read_patch_meta
from deltapatch.errors import DatasetError, DeltapatchError, GateFailed
from deltapatch.evaluate import BaseCheck
from deltapatch.faults import checkpoint_dir, ride_out, training_key
from deltapatch.gate import Champion, GateResult, run_gate
from deltapatch.inbox import in_inbox, release
from deltapatch.models.pretrain import ensure_base
from deltapatch.patching import PatchResult, PatchSession, train_patch
from deltapatch.registry import registry
from deltapatch.registry.tracking import registry_settings, ui_url
from deltapatch.step_results import Ingested, Registered, TrainedPatch, Versioned
from deltapatch.train import EpochRecord, FitResult, TrainSettings, resolve_device

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ ingest


def base_step(params: dict[str, Any], progress: bool = False, say: Callable[[str], None] | None = None) -> str:
    """The base model exists before any data is touched (pre-trained now for the embedded default;
    ConfigError naming the file for a user's base). Returns the weights path."""
    return str(ensure_base(params, progress=progress, say=say or log.info))


def ingest_step(params: dict[str, Any], path: str | os.PathLike[str], task: str | None = None) -> Ingested:
    """Validate, normalise and version the dataset at `path` (ingest quarantines a rejected input;
    an arrival identical to another task is refused and quarantined here)."""
    result = ingest(path, params, task=task)
    if result.status == "unchanged" and result.duplicate_of and result.duplicate_of != result.task:
        message = (f"exact duplicate: the dataset for '{result.task}' is identical to the already ingested task "
                   f"'{result.duplicate_of}' (data version {result.data_version}); nothing to train")
        kept = ""
        if in_inbox(params, path) and Path(path).exists():
            folder = quarantine(params, Path(path), message)
            kept = f" (input kept in {folder.relative_to(project_root(params).resolve())}/)"
        raise DatasetError(message + kept, hint=f"submit it with --task {result.duplicate_of} to retrain that task")
    version = result.data_version
    return Ingested(task=result.task, status=result.status, task_dir=str(result.task_dir),
                    manifest_sha256=result.manifest_sha256, data_version=str(version) if version else "",
                    data_version_info=version.as_dict() if version else None, n_images=dict(result.n_images),
                    classes=list(result.classes), skipped=len(result.skipped), warnings=list(result.warnings))


def version_step(params: dict[str, Any], ingested: Ingested) -> Versioned:
    """Make sure the data version is on the DVC remote (``dvc push``); raises so the flow retries.

    Ingest already commits the version and tries one push; this step repeats the push (a no-op when
    the remote has it) so a flaky remote is retried with back-off instead of silently skipped.
    """
    problem = push_data(params)
    if problem and problem.startswith("no default DVC remote"):
        return Versioned(pushed=False, note=problem, data_version=ingested.data_version)
    if problem:
        raise VersioningError(problem)
    return Versioned(pushed=True, note="", data_version=ingested.data_version)


# ------------------------------------------------------------------------------------------- train


def checkpoint_path(params: dict[str, Any], task: str, manifest_sha256: str, epochs: int | None = None) -> Path:
    """``<faults.checkpoint_dir>/<task>-<training key>.pt``: only the same training (task, data, recipe,
    base: :func:`deltapatch.faults.training_key`) ever resumes from it."""
    key = training_key(params, task, manifest_sha256, epochs)
    return checkpoint_dir(params) / f"{task}-{key.removeprefix('train-')[:16]}.pt"


def patch_out_dir(params: dict[str, Any], task: str, manifest_sha256: str) -> Path:
    # The folder is called "patch": MLflow logs a pyfunc artifact folder under its own name, and the
    # registry expects artifacts/patch/ (see registry.register_patch).
    return state_dir(params) / "patches" / task / manifest_sha256[:16] / "patch"


def train_step(params: dict[str, Any], task: str, task_dir: str | os.PathLike[str], data_version: str = "", *,
               manifest_sha256: str | None = None, epochs: int | None = None, progress: bool = False,
               out_dir: str | os.PathLike[str] | None = None,
               on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainedPatch:
    """Train the task's Δ-patch; checkpoints every epoch (:func:`checkpoint_path`) and resumes from it
    when run again — on any worker that can read ``faults.checkpoint_dir``.

    The result carries the patch files themselves (base64; a patch is a few hundred kB at most), so a
    worker on another machine can hand the patch back through Prefect's result storage;
    :func:`materialise_patch` writes them out again.
    """
    # The working copy's folder when it holds this data version, else an export of that version
    # from DVC (a re-ingested task rebased onto a new base; a worker on another machine).
    task_dir = task_data_at(params, task, data_version, manifest_sha256, folder=task_dir)
    sha = manifest_sha256 or file_sha256(task_dir / "manifest.csv")
    ckpt = checkpoint_path(params, task, sha, epochs)
    out = Path(out_dir) if out_dir else patch_out_dir(params, task, sha)
    data = load_task_dir(task_dir, int(params["base"]["input_size"]), name=task)
    started = time.perf_counter()
    result = train_patch(params, data, out_dir=out, checkpoint=ckpt, progress=progress,
                         on_epoch=on_epoch, data_version=data_version, epochs=epochs)
    ckpt.unlink(missing_ok=True)  # done: a later run on the same data starts fresh
    return TrainedPatch(
        task=task, patch_dir=str(out), metrics=dict(result.metrics), base_check=dataclasses.asdict(result.base_check),
        resumed_from_epoch=result.fit.resumed_from_epoch, checkpoint=str(ckpt),
        training_key=training_key(params, task, sha, epochs), epochs_run=len(result.fit.history),
        history=[dataclasses.asdict(r) for r in result.fit.history], device=_device_name(params),
        data_version=data_version, wall_seconds=time.perf_counter() - started, files=_patch_files(out))


def _device_name(params: dict[str, Any]) -> str:
    """The device training used (train.device: auto → cuda when present, with AMP per train.amp)."""
    return str(resolve_device(section(params, "train", TrainSettings).device))


def _patch_files(patch_dir: Path) -> dict[str, str]:
    return {p.name: base64.b64encode(p.read_bytes()).decode() for p in sorted(patch_dir.iterdir()) if p.is_file()}


def materialise_patch(params: dict[str, Any], trained: TrainedPatch) -> Path:
    """Make sure the trained patch exists locally (it may have been trained on another machine)."""
    out = Path(trained.patch_dir)
    files = trained.files
    root = project_root(params).resolve()
    here = out.resolve() == root or root in out.resolve().parents
    # A folder outside this project is another machine's (or another clone's): use the files the run
    # returned, never that path, even when this file system happens to show it.
    if files and (not here or not all((out / name).is_file() for name in files)):
        out = state_dir(params) / "patches" / trained.task / f"received-{int(time.time() * 1000)}" / "patch"
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (out / name).write_bytes(base64.b64decode(blob))
    return out


# -------------------------------------------------------------------------------------------- gate


def champions(params: dict[str, Any], exclude: str | None = None, *, dst: str | os.PathLike[str]) -> list[Champion]:
    """The promoted patch of every other task (from the registry), downloaded into `dst/<task>/` (the
    caller owns `dst` and removes it), as gate Champions."""
    out = []
    for task, info in sorted(registry.champions(params).items()):
        if task == exclude:
            continue
        patch_dir = registry.download_patch(params, task, info["version"], dst=Path(dst) / task)
        acc = info.get("patch_acc")
        out.append(Champion(task=task, version=str(info["version"]), patch_dir=Path(patch_dir),
                            test_acc=float("nan") if acc is None else float(acc),
                            data_version=str(info.get("data_version") or "")))
    return out


def gate_step(params: dict[str, Any], task: str, patch_dir: str | os.PathLike[str],
              session: PatchSession | None = None, say: Callable[[str], None] | None = None) -> GateResult:
    """Run the non-regression gate against the currently promoted patches; returns a GateResult.
    Reading them from the registry rides out an MLflow restart (``faults.outage_window_s``)."""
    # The champions' files are read into the network by run_gate; the downloads go when it returns.
    with tempfile.TemporaryDirectory(prefix="deltapatch-champions-") as tmp:
        promoted = ride_out(lambda: champions(params, exclude=task, dst=tmp), params, "reading the promoted patches",
                            say)
        return run_gate(params, session, task, Path(patch_dir), promoted)


# ---------------------------------------------------------------------------------------- registry


def register_step(params: dict[str, Any], trained: TrainedPatch, gate: GateResult, data_version: str,
                  say: Callable[[str], None] | None = None) -> Registered:
    """Log the MLflow run and register the version (tagged gate=failed when the gate failed). Each of
    the two calls rides out an MLflow restart on its own, so a retry never logs the run twice."""
    patch_dir = materialise_patch(params, trained)
    result = _patch_result(trained, patch_dir)
    gate_dict = gate.as_dict()
    task_dir = tasks_dir(params) / trained.task
    data = load_task_dir(task_dir, int(params["base"]["input_size"]), name=trained.task) \
        if (task_dir / "manifest.csv").is_file() else None
    run_id = ride_out(lambda: registry.log_patch_run(params, result, data=data, gate=gate_dict, data_version=data_version),
                      params, "logging the MLflow run", say)
    version = ride_out(lambda: registry.register_patch(params, run_id, result, gate_dict, data_version), params,
                       "registering the patch", say)
    return Registered(task=trained.task, version=str(version), run_id=run_id, gate_passed=gate.passed,
                      mlflow_url=mlflow_link(params, trained.task, version))


def _patch_result(trained: TrainedPatch, patch_dir: Path) -> PatchResult:
    """The PatchResult the registry logs, from a (possibly remote) training's record."""
    fit = FitResult([EpochRecord(**r) for r in trained.history], trained.resumed_from_epoch)
    return PatchResult(trained.task, patch_dir, read_patch_meta(patch_dir), fit, BaseCheck(**trained.base_check),
                       dict(trained.metrics))


def promote_step(params: dict[str, Any], task: str, version: str, reason: str = "",
                 say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Promote `version` to champion; rides out an MLflow restart (``faults.outage_window_s``)."""
    return ride_out(lambda: registry.promote(params, task, version, reason or "passed the non-regression gate"),
                    params, "promoting", say)


def mlflow_link(params: dict[str, Any], task: str, version: int | str) -> str:
    """Browser link to the registered version ('' when the registry is not an HTTP server)."""
    base = ui_url(params)
    if not base:
        return ""
    return f"{base}/#/models/{registry_settings(params).model_name(task)}/versions/{version}"


# ---------------------------------------------------------------------------------------- summary


@dataclass
class PipelineOutcome:
    task: str
    status: str  # promoted | gate-failed
    data_version: str = ""
    version: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    mlflow_url: str = ""
    seconds: float = 0.0
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def summary_markdown(outcome: PipelineOutcome) -> str:
    """The per-run markdown report (a Prefect artifact, also printed by `deltapatch run`)."""
    m = outcome.metrics
    base = outcome.gate.get("checks", [])
    base_check = next((c for c in base if c["name"] == "base"), None)
    base_text = ("bit-identical ✅" if base_check and base_check["passed"] else
                 f"FAILED ❌ ({base_check['detail']})" if base_check else "not run")
    status = {"promoted": "✅ promoted", "gate-failed": "❌ gate failed"}.get(outcome.status, outcome.status)
    link = f"[{outcome.mlflow_url}]({outcome.mlflow_url})" if outcome.mlflow_url else "(registry not on a server)"
    rows = [
        ("task", f"`{outcome.task}`"), ("result", status), ("registered version", outcome.version or "-"),
        ("data version", f"`{outcome.data_version}`"),
        ("patch accuracy (test)", _fmt(m.get("patch_acc"))), ("base check", base_text),
        ("trainable params", f"{_fmt(m.get('trainable_pct'), '.3f')} % ({int(m.get('trainable_params', 0)):,})"),
        ("patch size", f"{int(m.get('patch_bytes', 0)):,} bytes"),
        ("train time", f"{_fmt(m.get('train_seconds'), '.1f')} s"), ("MLflow", link),
    ]
    lines = [f"# Δ-patch `{outcome.task}`: {status}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if outcome.gate.get("checks"):
        lines += ["", "## Gate", "", "| check | passed | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {'✅' if c['passed'] else '❌'} | {c['detail']} |" for c in outcome.gate["checks"]]
    if outcome.message:
        lines += ["", outcome.message]
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str = ".3f") -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "-"


def artifact_key(task: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "patch-" + (re.sub(r"[^a-z0-9-]+", "-", task.lower()).strip("-") or "task")


# ------------------------------------------------------------------------------------ no-Prefect run


def run_pipeline(params: dict[str, Any], path: str | os.PathLike[str], task: str | None = None, *,
                 epochs: int | None = None, progress: bool = True) -> PipelineOutcome:
    """All steps in this process, without Prefect (scripts, notebooks, `deltapatch run --no-prefect`)."""
    started = time.perf_counter()
    base_step(params, progress=progress)
    try:
        ingested = ingest_step(params, path, task)
    except DatasetError:
        release_step(params, path)
        raise
    try:
        version_step(params, ingested)
        trained = train_step(params, ingested.task, ingested.task_dir, ingested.data_version,
                             manifest_sha256=ingested.manifest_sha256, epochs=epochs, progress=progress)
        return finish(params, ingested, trained, started)
    finally:
        release_step(params, path)


def release_step(params: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """The run of the dataset at `path` has ended (versioned or quarantined): out of the inbox."""
    return release(params, path)


def gate_hint(task: str, version: int | str) -> str:
    """What to do after a failed gate (the serving champion is untouched)."""
    return (f"the champion of '{task}' is unchanged; every check is in `deltapatch patches show {task}@{version}`; "
            f"retrain with more data or epochs, or adjust the `gate:` settings in params.yaml")


@dataclass(frozen=True)
class FinishSteps:
    """How :func:`finish` runs its steps: in this process (:func:`local_steps`), or as the Prefect
    tasks of flows/patch_task.py (each with its own retries and its own row in the UI).

    gate(task, trained) → GateResult; register(trained, gate, data_version) → Registered;
    promote(task, version).
    """

    gate: Callable[[str, TrainedPatch], GateResult]
    register: Callable[[TrainedPatch, GateResult, str], Registered]
    promote: Callable[[str, str], object]


def local_steps(params: dict[str, Any]) -> FinishSteps:
    """The steps after training as plain calls in this process."""
    return FinishSteps(
        gate=lambda task, trained: gate_step(params, task, materialise_patch(params, trained)),
        register=lambda trained, gate, data_version: register_step(params, trained, gate, data_version),
        promote=lambda task, version: promote_step(params, task, version),
    )


def finish(params: dict[str, Any], ingested: Ingested, trained: TrainedPatch, started: float,
           gate: GateResult | None = None, *, steps: FinishSteps | None = None, preface: str = "",
           report: Callable[[PipelineOutcome], None] | None = None) -> PipelineOutcome:
    """gate → register → promote (or register as failed and raise GateFailed).

    `steps`: how each step runs (default :func:`local_steps`); `preface`: put before the gate's
    message in the outcome's; `report(outcome)` runs once the outcome is known, before a GateFailed.
    """
    task = ingested.task
    steps = steps or local_steps(params)
    gate = gate if gate is not None else steps.gate(task, trained)
    registered = steps.register(trained, gate, ingested.data_version)
    outcome = PipelineOutcome(task, "promoted" if gate.passed else "gate-failed", ingested.data_version,
                              registered.version, trained.metrics, gate.as_dict(), registered.mlflow_url,
                              time.perf_counter() - started, preface + gate.message)
    if gate.passed:
        steps.promote(task, registered.version)
    if report is not None:
        report(outcome)
    if not gate.passed:
        raise GateFailed(f"{gate.message}; version {registered.version} registered as failed, not promoted",
                         hint=gate_hint(task, registered.version))
    return outcome


def project_params(project: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Load params for a flow parameter `project` (None: $DELTAPATCH_PROJECT or the cwd's project).

    On a worker machine (``$DELTAPATCH_WORKER_PROJECT``, set by `deltapatch worker start`) its own
    clone of the project, whatever path the submitting machine passed: that path is not this machine's.
    """
    local = os.environ.get("DELTAPATCH_WORKER_PROJECT", "").strip()
    if local:
        return load_params(Path(local).resolve())
    return load_params(Path(project).resolve() if project else None)


__all__ = [
    "DeltapatchError", "FinishSteps", "Ingested", "PipelineOutcome", "Registered", "TrainedPatch", "Versioned", "artifact_key", "base_step", "champions", "gate_hint",
    "checkpoint_path", "finish", "gate_step", "ingest_step", "local_steps", "materialise_patch", "mlflow_link",
    "project_params", "project_root", "promote_step", "register_step", "release_step", "run_pipeline",
    "summary_markdown", "train_step", "version_step",
]
