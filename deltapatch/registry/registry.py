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

The code is one module per part; this module re-exports their public names (import from here):

    client.py          version-tag names (T_*), artifact paths, the MLflow client, the per-name file lock,
                       MLflow/network failures → RegistryError
    model_versions.py  log the pyfunc (signature, input example, requirements); register a verified version
    base_model.py      register_base, find_base_version
    runs.py            patch_run / PatchRun, log_result, log_patch_run, params_for_mlflow
    patches.py         register_patch, gate_status
    reading.py         list_patches, get_version, champions, download_patch, model_uri
    aliases.py         promote, rollback
"""

from __future__ import annotations

from deltapatch.registry.aliases import promote, rollback
from deltapatch.registry.base_model import find_base_version, register_base
from deltapatch.registry.client import (
    MODEL_ARTIFACT_PATH,
    MODEL_FILE,
    PATCH_ARTIFACT,
    T_BASE_CHECK,
    T_BASE_FP,
    T_BASE_VERSION,
    T_DATA_VERSION,
    T_GATE,
    T_KIND,
    T_PATCH_ACC,
    T_PATCH_BYTES,
    T_REGISTRATION,
    T_TASK,
    T_TRAINABLE_PCT,
)
from deltapatch.registry.patches import gate_status, register_patch
from deltapatch.registry.reading import champions, download_patch, get_version, list_patches, model_uri
from deltapatch.registry.runs import PatchRun, log_patch_run, log_result, params_for_mlflow, patch_run

__all__ = [
    "MODEL_ARTIFACT_PATH", "MODEL_FILE", "PATCH_ARTIFACT",
    "T_BASE_CHECK", "T_BASE_FP", "T_BASE_VERSION", "T_DATA_VERSION", "T_GATE", "T_KIND", "T_PATCH_ACC",
    "T_PATCH_BYTES", "T_REGISTRATION", "T_TASK", "T_TRAINABLE_PCT",
    "PatchRun", "champions", "download_patch", "find_base_version", "gate_status", "get_version",
    "list_patches", "log_patch_run", "log_result", "model_uri", "params_for_mlflow", "patch_run",
    "promote", "register_base", "register_patch", "rollback",
]
