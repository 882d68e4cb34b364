"""The MLflow patch registry: runs, registered versions, the `champion` alias, rollback.

    with patch_run(params, "shapes", data_version=dv) as run:          # one MLflow run per training
        result = train_patch(params, data, out_dir=..., on_epoch=run.on_epoch)
        run.log_result(result, data=data, session=session, gate=gate)
    version = register_patch(params, run.run_id, result, gate, dv)      # new version of deltapatch-shapes
    if gate["passed"]:
        promote(params, "shapes", version, reason="gate passed")        # → @champion
    rollback(params, "shapes", reason="bad labels")                     # champion → previous passed version

Registered models: ``<prefix>base`` (the base, registered once per fingerprint, with its weights) and
``<prefix><task>`` (one version per trained patch: a models-from-code pyfunc whose artifacts are the
patch files only; the base is referred to by name, version and fingerprint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import mlflow
import numpy as np
import torch
from filelock import FileLock, Timeout
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from deltapatch.config import state_dir
from deltapatch.delta.patch import META_FILE, TENSORS_FILE, patch_bytes
from deltapatch.errors import DeltapatchError, RegistryError, RegistryUnreachable
from deltapatch.models.base import BaseModel, load_base, sidecar_path
from deltapatch.registry import plots
from deltapatch.registry.runtime import Predictor
from deltapatch.registry.tracking import (
    RegistrySettings,
    _first_line,
    configure,
    experiment_id,
    registry_settings,
)
from deltapatch.train import predict_logits

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

    from deltapatch.data.dataset import TaskData
    from deltapatch.patching import PatchResult, PatchSession
    from deltapatch.train import EpochRecord

F = TypeVar("F", bound=Callable[..., Any])

MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_PATH = "model"
PATCH_ARTIFACT = "patch"

# version tags
T_TASK = "task"
T_KIND = "kind"
T_BASE_FP = "base_fingerprint"
T_BASE_VERSION = "base_version"
T_DATA_VERSION = "data_version"
T_GATE = "gate"
T_PATCH_ACC = "patch_acc"
T_BASE_CHECK = "base_check"
T_TRAINABLE_PCT = "trainable_pct"
T_PATCH_BYTES = "patch_bytes"
T_REGISTRATION = "registration"  # "complete" once artifacts are verified; "failed" if cleanup could not delete


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _wrap_errors(func: F) -> F:
    """MLflow / network failures → RegistryError with one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DeltapatchError:
            raise
        except MlflowException as exc:
            if _unreachable(exc):
                raise RegistryUnreachable(f"MLflow did not answer {func.__name__}: {_first_line(exc)}") from None
            raise RegistryError(f"MLflow refused {func.__name__}: {_first_line(exc)}") from None
        except OSError as exc:
            kind = RegistryUnreachable if isinstance(exc, (ConnectionError, TimeoutError)) else RegistryError
            raise kind(f"MLflow I/O failed during {func.__name__} (server unreachable or artifact store not writable): {_first_line(exc)}") from None

    return wrapper  # type: ignore[return-value]


def _unreachable(exc: Exception) -> bool:
    """An MlflowException of the REST client that says the server did not answer (connection refused
    or dropped after MLflow's own retries, a timeout, an HTTP 5xx) rather than refused the request."""
    text = str(exc)
    return text.startswith("API request to") and ("failed with exception" in text or "timeout" in text
                                                   or re.search(r"failed with error code 5\d\d", text) is not None)


def _client(params: dict[str, Any]) -> MlflowClient:
    uri = configure(params)
    return MlflowClient(uri, uri)


def _lock(params: dict[str, Any], name: str, settings: RegistrySettings) -> contextlib.AbstractContextManager[None]:
    folder = state_dir(params) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"registry-{name}.lock"), timeout=settings.lock_timeout_s)

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        try:
            with lock:
                yield
        except Timeout:
            raise RegistryError(
                f"another promotion/rollback of '{name}' holds {lock.lock_file} for over "
                f"{settings.lock_timeout_s:.0f} s; retry later (registry.lock_timeout_s)"
            ) from None

    return held()


# ------------------------------------------------------------------------------------------ signature
def _signature(input_size: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, input_size, input_size, 3))]),
        outputs=Schema([ColSpec("string", "task"), ColSpec("string", "class"), ColSpec("long", "class_index"),
                        ColSpec("double", "score"), ColSpec("string", "scores")]),
    )


def _input_example(input_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(2, input_size, input_size, 3), dtype=np.uint8)


def _pip_requirements() -> list[str]:
    return ["deltapatch", f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            "torchvision", "safetensors", "numpy", "pandas", "pillow"]


@contextlib.contextmanager
def _active_run(run_id: str) -> Iterator[None]:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


def _log_pyfunc(run_id: str, artifacts: dict[str, str], model_config: dict[str, Any], input_size: int) -> ModelInfo:
    with _active_run(run_id):
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=str(MODEL_FILE),
            artifacts=artifacts,
            model_config=model_config,
            signature=_signature(input_size),
            input_example=_input_example(input_size),
            pip_requirements=_pip_requirements(),
        )


def _create_version(params: dict[str, Any], client: MlflowClient, name: str, model_info: ModelInfo, run_id: str,
                    tags: dict[str, str], description: str, required: Sequence[str]) -> int:
    """Register `model_info` as a new version of `name`; verify its artifacts; never leave a
    half-registered version behind (deleted, or tagged registration=failed if deletion fails too)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name, tags={"managed_by": "deltapatch"})
    mv = client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                     tags={**tags, T_REGISTRATION: "pending"}, description=description,
                                     model_id=getattr(model_info, "model_id", None))
    version = int(mv.version)
    try:
        uri = client.get_model_version_download_uri(name, str(version))
        for rel in required:
            folder, _, filename = rel.rpartition("/")
            listing = mlflow.artifacts.list_artifacts(artifact_uri=f"{uri.rstrip('/')}/{folder}")
            names = {Path(item.path).name for item in listing or []}
            if filename not in names:
                raise RegistryError(f"artifact {rel} is missing from {name} version {version}")
        client.set_model_version_tag(name, str(version), T_REGISTRATION, "complete")
    except Exception as exc:
        _discard_version(client, name, version)
        message = exc if isinstance(exc, DeltapatchError) else _first_line(exc)
        raise RegistryError(f"registering {name} version {version} failed ({message}); the version was "
                            f"removed (or tagged {T_REGISTRATION}=failed)") from None
    return version


def _discard_version(client: MlflowClient, name: str, version: int) -> None:
    try:
        client.delete_model_version(name, str(version))
    except Exception:  # noqa: BLE001 — best effort; fall back to marking it
        with contextlib.suppress(Exception):
            client.set_model_version_tag(name, str(version), T_REGISTRATION, "failed")


# ------------------------------------------------------------------------------------------ base
def _base_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        return list(client.search_model_versions(f"name='{name}'"))
    except MlflowException:
        return []


@_wrap_errors
def register_base(params: dict[str, Any], base: BaseModel | None = None) -> int:
    """Register the project's base model as ``<prefix>base`` once per fingerprint (its weights and
    sidecar as artifacts, the fingerprint as a tag); returns the version (existing or new)."""
    settings = registry_settings(params)
    base = base or load_base(params)
    name = settings.base_model_name
    client = _client(params)
    found = find_base_version(params, base.fingerprint, client=client)
    if found is not None:
        return found
    with _lock(params, name, settings):
        found = find_base_version(params, base.fingerprint, client=client)
        if found is not None:
            return found
        run = client.create_run(experiment_id(params), run_name="register-base",
                                tags={"deltapatch.kind": "base", T_BASE_FP: base.fingerprint})
        run_id = run.info.run_id
        try:
            sidecar = sidecar_path(base.weights_path)
            artifacts = {"weights": str(base.weights_path)}
            if sidecar.is_file():
                artifacts["sidecar"] = str(sidecar)
            config = {"kind": "base", "base_fingerprint": base.fingerprint, "arch": base.settings.arch}
            info = _log_pyfunc(run_id, artifacts, config, int(base.settings.input_size))
            tags = {T_KIND: "base", T_BASE_FP: base.fingerprint, "arch": base.settings.arch,
                    "class_names": json.dumps(base.class_names), "base_params": str(base.total_params)}
            version = _create_version(params, client, name, info, run_id, tags,
                                      f"frozen base {base.settings.arch} ({base.fingerprint[:19]}…)",
                                      [f"artifacts/{base.weights_path.name}"])
            client.set_terminated(run_id, "FINISHED")
            return version
        except BaseException:
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, "FAILED")
            raise


def find_base_version(params: dict[str, Any], fingerprint: str, client: MlflowClient | None = None) -> int | None:
    """The registered base version with this fingerprint (complete registrations only), or None."""
    client = client or _client(params)
    name = registry_settings(params).base_model_name
    for mv in sorted(_base_versions(client, name), key=lambda m: int(m.version)):
        tags = dict(mv.tags or {})
        if tags.get(T_BASE_FP) == fingerprint and tags.get(T_REGISTRATION) == "complete":
            return int(mv.version)
    return None


# ------------------------------------------------------------------------------------------ runs
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


# ------------------------------------------------------------------------------------------ patches
def gate_status(gate: dict[str, Any] | None) -> str:
    """'passed' / 'failed' from a gate result dict (`passed: bool`, or `status`/`result` strings)."""
    if not gate:
        return "failed"
    if "passed" in gate:
        return "passed" if bool(gate["passed"]) else "failed"
    for key in ("status", "result", "gate"):
        value = str(gate.get(key, "")).lower()
        if value in ("passed", "pass", "ok", "true"):
            return "passed"
        if value:
            return "failed"
    return "failed"


@_wrap_errors
def register_patch(params: dict[str, Any], run_id: str, result: PatchResult, gate: dict[str, Any] | None,
                   data_version: str = "") -> int:
    """Register run `run_id`'s patch as a new version of ``<prefix><task>`` (models-from-code pyfunc,
    artifacts = the patch files only, the base referred to by name/version/fingerprint). Tags: base
    fingerprint & version, data version, gate, patch accuracy, base check, trainable %, patch bytes.
    A failed-gate version is registered (for the record) but never promoted. Returns the version."""
    settings = registry_settings(params)
    client = _client(params)
    meta = result.meta
    base_version = find_base_version(params, meta.base_fingerprint, client=client)
    if base_version is None:
        base = load_base(params)
        if base.fingerprint != meta.base_fingerprint:
            raise RegistryError(
                f"patch '{meta.task}' was trained on base {meta.base_fingerprint[:19]}…, which is not registered "
                f"and is not this project's base ({base.fingerprint[:19]}…); cannot register it"
            )
        base_version = register_base(params, base)
    check = result.base_check
    base_check = "bit-identical" if check.bit_identical else f"max|dlogit|={check.max_abs_diff:.3g}"
    metrics = result.metrics
    data_version = data_version or meta.data_version or ""
    tags = {
        T_TASK: meta.task, T_KIND: "patch", T_BASE_FP: meta.base_fingerprint, T_BASE_VERSION: str(base_version),
        T_DATA_VERSION: data_version, T_GATE: gate_status(gate),
        T_PATCH_ACC: f"{float(metrics.get('patch_acc', float('nan'))):.4f}",
        T_BASE_CHECK: base_check, "base_acc_change": f"{check.acc_change:+.4f}",
        T_TRAINABLE_PCT: f"{float(metrics.get('trainable_pct', float('nan'))):.4f}",
        T_PATCH_BYTES: str(int(patch_bytes(result.patch_dir))), "delta_kind": meta.delta_kind, "run_id": run_id,
    }
    if gate:
        tags["gate_detail"] = json.dumps(gate, default=str)[:4000]
    config = {"kind": "patch", "task": meta.task, "base_model": settings.base_model_name,
              "base_version": str(base_version), "base_fingerprint": meta.base_fingerprint}
    try:
        with tempfile.TemporaryDirectory(prefix="deltapatch-stage-") as tmp:
            staged = Path(tmp) / PATCH_ARTIFACT  # pyfunc keeps a folder artifact's own name
            staged.mkdir()
            for filename in (TENSORS_FILE, META_FILE):
                shutil.copy2(Path(result.patch_dir) / filename, staged / filename)
            info = _log_pyfunc(run_id, {PATCH_ARTIFACT: str(staged)}, config, int(meta.input_size))
    except DeltapatchError:
        raise
    except Exception as exc:  # upload failed: nothing was registered
        raise RegistryError(f"uploading the patch model of '{meta.task}' failed ({_first_line(exc)}); "
                            f"no version was registered") from None
    description = (f"Δ-patch '{meta.task}' ({meta.delta_kind}) on base v{base_version}; gate {tags[T_GATE]}, "
                   f"patch_acc {tags[T_PATCH_ACC]}")
    return _create_version(params, client, settings.model_name(meta.task), info, run_id, tags, description,
                           [f"artifacts/{PATCH_ARTIFACT}/{TENSORS_FILE}", f"artifacts/{PATCH_ARTIFACT}/{META_FILE}"])


# ------------------------------------------------------------------------------------------ reading
def _aliases(client: MlflowClient, name: str) -> dict[str, int]:
    rm = client.get_registered_model(name)
    raw = rm.aliases or {}
    if isinstance(raw, dict):
        return {alias: int(v) for alias, v in raw.items()}
    return {a.alias: int(a.version) for a in raw}


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _version_info(task: str, mv: ModelVersion, aliases: dict[str, int]) -> dict[str, Any]:
    tags = dict(mv.tags or {})
    version = int(mv.version)
    return {
        "task": task, "model_name": mv.name, "version": version,
        "aliases": sorted(a for a, v in aliases.items() if v == version),
        "gate": tags.get(T_GATE, "passed" if task == "base" else ""),
        "patch_acc": _float(tags.get(T_PATCH_ACC)),
        "base_fingerprint": tags.get(T_BASE_FP, ""), "base_version": _int(tags.get(T_BASE_VERSION)),
        "data_version": tags.get(T_DATA_VERSION, ""), "patch_bytes": _int(tags.get(T_PATCH_BYTES)),
        "trainable_pct": _float(tags.get(T_TRAINABLE_PCT)), "base_check": tags.get(T_BASE_CHECK, ""),
        "registration": tags.get(T_REGISTRATION, ""),
        "created": datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, UTC).isoformat(timespec="seconds"),
        "run_id": mv.run_id or "", "source": mv.source or "", "description": mv.description or "",
        "tags": tags,
    }


def _task_of(settings: RegistrySettings, name: str) -> str:
    return name[len(settings.model_prefix):]


@_wrap_errors
def list_patches(params: dict[str, Any], task: str | None = None) -> list[dict[str, Any]]:
    """Every registered patch version (optionally of one task), newest version first per task."""
    settings = registry_settings(params)
    client = _client(params)
    if task:
        names = [settings.model_name(task)]
    else:
        names = sorted(rm.name for rm in client.search_registered_models(max_results=1000)
                       if rm.name.startswith(settings.model_prefix) and rm.name != settings.base_model_name)
    rows: list[dict[str, Any]] = []
    for name in names:
        try:
            aliases = _aliases(client, name)
        except MlflowException:
            if task:
                raise RegistryError(f"no registered patches for task '{task}' (model {name} does not exist)",
                                    hint="`deltapatch patches list` shows the registered tasks") from None
            continue
        versions = client.search_model_versions(f"name='{name}'")
        for mv in sorted(versions, key=lambda m: -int(m.version)):
            rows.append(_version_info(_task_of(settings, name), mv, aliases))
    return rows


@_wrap_errors
def get_version(params: dict[str, Any], task: str, version: int | str | None = None,
                alias: str | None = None) -> dict[str, Any]:
    """One version's info (`task` 'base' = the base model). Default: the champion (the latest for base)."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.base_model_name if task == "base" else settings.model_name(task)
    try:
        aliases = _aliases(client, name)
    except MlflowException:
        raise RegistryError(f"nothing registered for task '{task}' (no model {name})",
                            hint="`deltapatch patches list` shows the registered tasks") from None
    if version is None and alias is None:
        if task == "base":
            versions = [int(m.version) for m in client.search_model_versions(f"name='{name}'")]
            if not versions:
                raise RegistryError(f"{name} has no versions")
            version = max(versions)
        else:
            alias = settings.champion_alias
    if alias is not None:
        if alias not in aliases:
            raise RegistryError(f"task '{task}' has no version with alias '{alias}' (aliases: {sorted(aliases) or 'none'})",
                                hint=f"`deltapatch patches list --task {task}` shows its versions and aliases")
        version = aliases[alias]
    try:
        mv = client.get_model_version(name, str(int(version)))  # type: ignore[arg-type]
    except (MlflowException, ValueError):
        raise RegistryError(f"task '{task}' has no version {version}",
                            hint=f"`deltapatch patches list --task {task}` shows its versions") from None
    return _version_info(task, mv, aliases)


@_wrap_errors
def champions(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task → info of its champion version, for every task that has one."""
    settings = registry_settings(params)
    client = _client(params)
    out: dict[str, dict[str, Any]] = {}
    for rm in client.search_registered_models(max_results=1000):
        if not rm.name.startswith(settings.model_prefix) or rm.name == settings.base_model_name:
            continue
        aliases = _aliases(client, rm.name)
        if settings.champion_alias in aliases:
            mv = client.get_model_version(rm.name, str(aliases[settings.champion_alias]))
            out[_task_of(settings, rm.name)] = _version_info(_task_of(settings, rm.name), mv, aliases)
    return out


@_wrap_errors
def download_patch(params: dict[str, Any], task: str, version: int | str | None = None, alias: str | None = None,
                   dst: Path | None = None) -> Path:
    """Download a version's patch files; returns the local folder holding patch.safetensors + patch.json."""
    info = get_version(params, task, version=version, alias=alias)
    _check_usable(info)
    configure(params)
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"deltapatch-{task}-v{info['version']}-"))
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"models:/{info['model_name']}/{info['version']}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    folder = local / "artifacts" / PATCH_ARTIFACT
    if not (folder / "patch.json").is_file():
        raise RegistryError(f"{uri}: no patch files in the downloaded model ({folder})")
    return folder


def model_uri(params: dict[str, Any], task: str, version: int | str | None = None, alias: str | None = None) -> str:
    """`models:/<prefix><task>/<version>` or `models:/<prefix><task>@<alias>` (default: @champion)."""
    settings = registry_settings(params)
    name = settings.base_model_name if task == "base" else settings.model_name(task)
    if version is not None:
        return f"models:/{name}/{version}"
    return f"models:/{name}@{alias or settings.champion_alias}"


# ------------------------------------------------------------------------------------------ aliases
def _check_usable(info: dict[str, Any]) -> None:
    if info["task"] != "base" and info.get("registration") not in ("complete", ""):
        raise RegistryError(
            f"task '{info['task']}' version {info['version']} is not a complete registration "
            f"({T_REGISTRATION}={info['registration']}); use another version"
        )


def _check_promotable(info: dict[str, Any]) -> None:
    _check_usable(info)
    if info["gate"] != "passed":
        raise RegistryError(
            f"task '{info['task']}' version {info['version']} failed its gate (gate={info['gate'] or 'unknown'}); "
            f"only gate-passed versions can be champion"
        )


@_wrap_errors
def promote(params: dict[str, Any], task: str, version: int | str, reason: str = "") -> dict[str, Any]:
    """Point `champion` at `version` (gate-passed, complete). Serialised per task with a file lock.
    Returns {task, from_version, to_version, at, reason}."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.model_name(task)
    with _lock(params, task, settings):
        info = get_version(params, task, version=version)
        _check_promotable(info)
        previous = _aliases(client, name).get(settings.champion_alias)
        at = _now()
        client.set_registered_model_alias(name, settings.champion_alias, str(info["version"]))
        v = str(info["version"])
        client.set_model_version_tag(name, v, "promoted_at", at)
        client.set_model_version_tag(name, v, "promoted_from", str(previous or ""))
        client.set_model_version_tag(name, v, "promotion_reason", reason or "")
        event = {"action": "promote", "at": at, "from_version": previous, "to_version": info["version"], "reason": reason}
        client.set_registered_model_tag(name, "last_alias_change", json.dumps(event))
        return {"task": task, **{k: event[k] for k in ("from_version", "to_version", "at", "reason")}}


@_wrap_errors
def rollback(params: dict[str, Any], task: str, to: int | str | None = None, reason: str = "") -> tuple[int, int]:
    """Move `champion` to the previous gate-passed version (or `to`); records when, from which
    version and why as tags. Returns (from_version, to_version)."""
    settings = registry_settings(params)
    client = _client(params)
    name = settings.model_name(task)
    with _lock(params, task, settings):
        rows = list_patches(params, task)
        current = next((r["version"] for r in rows if settings.champion_alias in r["aliases"]), None)
        if current is None:
            raise RegistryError(f"task '{task}' has no {settings.champion_alias}; nothing to roll back "
                                f"(use `deltapatch patches list --task {task}`)")
        by_version = {r["version"]: r for r in rows}
        if to is None:
            candidates = [r for r in rows if r["version"] < current and r["gate"] == "passed"
                          and r.get("registration") in ("complete", "")]
            if not candidates:
                raise RegistryError(f"task '{task}' has no gate-passed version older than champion v{current} "
                                    f"to roll back to")
            target = max(candidates, key=lambda r: r["version"])
        else:
            target_version = _int(to)
            if target_version is None or target_version not in by_version:
                known = sorted(by_version)
                raise RegistryError(f"task '{task}' has no version {to} (versions: {known}); rollback refused")
            target = by_version[target_version]
            _check_promotable(target)
            if target_version == current:
                raise RegistryError(f"version {current} of '{task}' is already {settings.champion_alias}")
        at = _now()
        to_version = int(target["version"])
        client.set_registered_model_alias(name, settings.champion_alias, str(to_version))
        client.set_model_version_tag(name, str(to_version), "rolled_back_at", at)
        client.set_model_version_tag(name, str(to_version), "rolled_back_from", str(current))
        client.set_model_version_tag(name, str(to_version), "rollback_reason", reason or "")
        client.set_model_version_tag(name, str(current), "demoted_at", at)
        client.set_model_version_tag(name, str(current), "demoted_reason", reason or "")
        event = {"action": "rollback", "at": at, "from_version": current, "to_version": to_version, "reason": reason}
        client.set_registered_model_tag(name, "last_alias_change", json.dumps(event))
        return int(current), to_version
