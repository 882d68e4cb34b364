"""Logging a models-from-code pyfunc (signature, input example, pip requirements) to a run, and
registering it as a new version whose artifacts are verified (never left half-registered)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from deltapatch.errors import DeltapatchError, RegistryError
from deltapatch.registry.client import MODEL_ARTIFACT_PATH, MODEL_FILE, T_REGISTRATION
from deltapatch.registry.tracking import _first_line

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo


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
