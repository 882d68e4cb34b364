"""MLflow runs of patch trainings: params, live per-epoch metrics, final metrics and artifacts
(patch files, learning curve, confusion matrix, evaluation report, gate result)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from deltapatch.errors import RegistryError
from deltapatch.models.base import load_base
from deltapatch.registry import plots
from deltapatch.registry.client import PATCH_ARTIFACT, T_DATA_VERSION, T_GATE, _client, _wrap_errors
from deltapatch.registry.patches import gate_status
from deltapatch.registry.runtime import Predictor
from deltapatch.registry.tracking import _first_line, experiment_id
from deltapatch.train import predict_logits

if TYPE_CHECKING:
    from deltapatch.data.dataset import TaskData
    from deltapatch.patching import PatchResult, PatchSession
    from deltapatch.train import EpochRecord


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)


def params_for_mlflow(params: dict[str, Any]) -> dict[str, str]:
    """params.yaml flattened to 'section.key' → value (the private '_root' key left out)."""
    out: dict[str, str] = {}
    _flatten("", {k: v for k, v in params.items() if not k.startswith("_")}, out)
    return {k[:250]: v[:6000] for k, v in out.items()}


class PatchRun:
    """One MLflow run of a patch training (see :func:`patch_run`)."""

    def __init__(self, params: dict[str, Any], client: MlflowClient, run_id: str, task: str) -> None:
        self.params, self.client, self.run_id, self.task = params, client, run_id, task

    def on_epoch(self, record: EpochRecord) -> None:
        """Pass as `train_patch(..., on_epoch=run.on_epoch)`: logs the epoch's metrics live."""
        step = int(record.epoch)
        now = int(datetime.now(UTC).timestamp() * 1000)
        values = {"train_loss": record.train_loss, "train_acc": record.train_acc, "val_acc": record.val_acc,
                  "epoch_seconds": record.seconds}
        metrics = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(float(v))]
        with contextlib.suppress(Exception):  # a metric hiccup never kills a training
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_result(self, result: PatchResult, *, data: TaskData | None = None, session: PatchSession | None = None,
                   gate: dict[str, Any] | None = None,
                   report: dict[str, Any] | None = None, extra_artifacts: Sequence[Path | str] = (),
                   log_history: bool = False) -> None:
        """Final metrics and artifacts: the patch files, learning curve, confusion matrix (when `data`
        is given), the evaluation report and the gate result."""
        log_result(self.params, self.run_id, result, data=data, session=session, gate=gate, report=report,
                   extra_artifacts=extra_artifacts, log_history=log_history, client=self.client)


@contextlib.contextmanager
def patch_run(params: dict[str, Any], task: str, *, data_version: str = "", run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[PatchRun]:
    """An MLflow run for one patch training: params from params.yaml logged at start; the run ends
    FINISHED, or FAILED if the block raises."""
    client = _client(params)
    run_tags = {"deltapatch.kind": "patch", "deltapatch.task": task, T_DATA_VERSION: data_version, **(tags or {})}
    try:
        run = client.create_run(experiment_id(params), run_name=run_name or f"patch-{task}", tags=run_tags)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"cannot start an MLflow run for '{task}': {_first_line(exc)}") from None
    run_id = run.info.run_id
    items = [Param(k, v) for k, v in params_for_mlflow(params).items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])
    try:
        yield PatchRun(params, client, run_id, task)
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    with contextlib.suppress(Exception):
        client.set_terminated(run_id, "FINISHED")


def _test_predictions(params: dict[str, Any], result: PatchResult, data: TaskData,
                      session: PatchSession | None) -> np.ndarray:
    if session is not None and result.task in session.net.tasks:
        net, norm = session.net, session.norm
        previous = net.active_task
        net.eval().select(result.task)
        try:
            logits = predict_logits(net, data.test, norm)
        finally:
            net.select(previous)
    else:
        predictor = Predictor(load_base(params))
        predictor.add_patch(result.patch_dir)
        predictor.net.select(result.task)
        logits = predict_logits(predictor.net, data.test, predictor.norm)
    return np.asarray(logits.argmax(1))


@_wrap_errors
def log_result(params: dict[str, Any], run_id: str, result: PatchResult, *, data: TaskData | None = None,
               session: PatchSession | None = None, gate: dict[str, Any] | None = None,
               report: dict[str, Any] | None = None, extra_artifacts: Sequence[Path | str] = (),
               log_history: bool = False, client: MlflowClient | None = None) -> None:
    """Log a PatchResult to run `run_id` (see PatchRun.log_result)."""
    client = client or _client(params)
    now = int(datetime.now(UTC).timestamp() * 1000)
    metrics = []
    if log_history:
        for r in result.fit.history:
            for key in ("train_loss", "train_acc", "val_acc"):
                value = float(getattr(r, key))
                if math.isfinite(value):
                    metrics.append(Metric(key, value, now, int(r.epoch)))
    for key, value in result.metrics.items():
        if isinstance(value, int | float) and math.isfinite(float(value)):
            metrics.append(Metric(f"final_{key}" if key in ("val_acc",) else key, float(value), now, 0))
    metrics.append(Metric("base_bit_identical", float(result.base_check.bit_identical), now, 0))
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start:start + 500])
    client.log_artifacts(run_id, str(result.patch_dir), PATCH_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="deltapatch-run-") as tmp:
        folder = Path(tmp)
        if result.fit.history:
            plots.learning_curve(result.fit.history, folder / "plots" / "learning_curve.png", f"{result.task}: learning curve")
        if data is not None and len(data.test):
            predictions = _test_predictions(params, result, data, session)
            labels = data.test.labels.numpy()
            matrix = plots.confusion_counts(labels, predictions, len(data.class_names))
            plots.confusion_matrix(matrix, data.class_names, folder / "plots" / "confusion_matrix.png",
                                   f"{result.task}: confusion matrix (test)")
            (folder / "report").mkdir(exist_ok=True)
            (folder / "report" / "confusion_matrix.json").write_text(
                json.dumps({"class_names": data.class_names, "matrix": matrix.tolist()}, indent=2))
        evaluation = {
            "task": result.task, "metrics": result.metrics, "base_check": dataclasses.asdict(result.base_check),
            "history": [dataclasses.asdict(r) for r in result.fit.history],
            "meta": {k: v for k, v in dataclasses.asdict(result.meta).items() if k != "metrics"},
            **({"report": report} if report else {}),
        }
        (folder / "report").mkdir(exist_ok=True)
        (folder / "report" / "evaluation.json").write_text(json.dumps(evaluation, indent=2, default=str))
        if gate is not None:
            (folder / "report" / "gate.json").write_text(json.dumps(gate, indent=2, default=str))
            client.set_tag(run_id, T_GATE, gate_status(gate))
        for sub in ("plots", "report"):
            if (folder / sub).is_dir():
                client.log_artifacts(run_id, str(folder / sub), sub)
    for extra in extra_artifacts:
        path = Path(extra)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), f"extra/{path.name}")
        elif path.is_file():
            client.log_artifact(run_id, str(path), "extra")


def log_patch_run(params: dict[str, Any], result: PatchResult, *, data: TaskData | None = None,
                  session: PatchSession | None = None,
                  gate: dict[str, Any] | None = None, report: dict[str, Any] | None = None,
                  extra_artifacts: Sequence[Path | str] = (), data_version: str = "") -> str:
    """After-the-fact variant of :func:`patch_run`: one run with params, per-epoch metrics from
    `result.fit.history` and all artifacts. Returns the run id."""
    with patch_run(params, result.task, data_version=data_version or result.meta.data_version) as run:
        run.log_result(result, data=data, session=session, gate=gate, report=report,
                       extra_artifacts=extra_artifacts, log_history=True)
    return run.run_id
