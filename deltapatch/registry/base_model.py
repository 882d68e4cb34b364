"""The registered base model ``<prefix>base``: registered once per fingerprint, found by fingerprint."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.models.base import BaseModel, load_base, sidecar_path
from deltapatch.registry.client import (
    T_BASE_FP,
    T_KIND,
    T_REGISTRATION,
    _client,
    _lock,
    _wrap_errors,
    model_versions,
)
from deltapatch.registry.model_versions import _create_version, _log_pyfunc
from deltapatch.registry.tracking import experiment_id, registry_settings

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion


def _base_versions(client: MlflowClient, name: str, page_size: int = 1000) -> list[ModelVersion]:
    try:
        return model_versions(client, name, page_size)
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
    settings = registry_settings(params)
    for mv in sorted(_base_versions(client, settings.base_model_name, settings.page_size), key=lambda m: int(m.version)):
        tags = dict(mv.tags or {})
        if tags.get(T_BASE_FP) == fingerprint and tags.get(T_REGISTRATION) == "complete":
            return int(mv.version)
    return None
