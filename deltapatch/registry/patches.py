"""Registering a trained patch as a new version of ``<prefix><task>``, tagged with its gate result."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltapatch.delta.patch import META_FILE, TENSORS_FILE, patch_bytes
from deltapatch.errors import DeltapatchError, RegistryError
from deltapatch.models.base import load_base
from deltapatch.registry.base_model import find_base_version, register_base
from deltapatch.registry.client import (
    PATCH_ARTIFACT,
    T_BASE_CHECK,
    T_BASE_FP,
    T_BASE_VERSION,
    T_DATA_VERSION,
    T_GATE,
    T_KIND,
    T_PATCH_ACC,
    T_PATCH_BYTES,
    T_TASK,
    T_TRAINABLE_PCT,
    _client,
    _wrap_errors,
)
from deltapatch.registry.model_versions import _create_version, _log_pyfunc
from deltapatch.registry.tracking import _first_line, registry_settings

if TYPE_CHECKING:
    from deltapatch.patching import PatchResult


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
