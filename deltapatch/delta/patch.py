"""The patch file format: `patch.safetensors` (tensors) + `patch.json` (metadata). Never pickled.

    <dir>/patch.safetensors   '<layer path>.<tensor>' → tensor: Δs, BatchNorm affine + stats, head
    <dir>/patch.json          PatchMeta below
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltapatch.delta.kinds import make_config
from deltapatch.delta.network import DeltaNetwork
from deltapatch.errors import FingerprintMismatch, PatchFormatError

FORMAT_VERSION = 1
TENSORS_FILE = "patch.safetensors"
META_FILE = "patch.json"


@dataclass
class PatchMeta:
    """Everything needed to load and use a patch, besides its tensors."""

    task: str
    class_names: list[str]
    delta_kind: str
    delta_config: dict[str, Any]
    base_arch: str
    base_fingerprint: str
    input_size: int
    mean: list[float]
    std: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    data_version: str = ""
    # The base's whole input recipe (models.base.preprocessing: size, mean/std, interpolation, crop).
    preprocessing: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path) -> PatchMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)  # noqa: E501
        if missing:
            raise PatchFormatError(f"{source}: missing fields {missing}; the file is not a deltapatch patch.json")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise PatchFormatError(
                f"{source}: patch format {data['format_version']} is newer than this deltapatch "
                f"({FORMAT_VERSION}); upgrade deltapatch"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def save_patch(net: DeltaNetwork, meta: PatchMeta, out_dir: Path) -> Path:
    """Write `meta.task`'s patch to `out_dir` (created); returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.task_state_dict(meta.task).items()}
    save_file(tensors, str(out_dir / TENSORS_FILE), metadata={"task": meta.task, "format_version": str(FORMAT_VERSION)})
    (out_dir / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=2, sort_keys=True) + "\n")
    return out_dir


def read_patch_meta(patch_dir: Path) -> PatchMeta:
    path = Path(patch_dir) / META_FILE
    if not path.is_file():
        raise PatchFormatError(f"{path} not found; a patch folder holds {META_FILE} and {TENSORS_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PatchFormatError(f"{path}: not valid JSON ({exc})") from None
    return PatchMeta.from_dict(data, path)


def patch_bytes(patch_dir: Path) -> int:
    """Size on disk of a patch (both files)."""
    return sum((Path(patch_dir) / name).stat().st_size for name in (TENSORS_FILE, META_FILE))


def load_patch(net: DeltaNetwork, patch_dir: Path, task: str | None = None) -> PatchMeta:
    """Load a patch onto `net` under `task` (default: the task named in patch.json).

    Refuses a patch made for another base model, naming both fingerprints.
    """
    patch_dir = Path(patch_dir)
    meta = read_patch_meta(patch_dir)
    if meta.base_fingerprint != net.base_fingerprint:
        raise FingerprintMismatch(
            f"{patch_dir}: patch '{meta.task}' was trained on base {meta.base_fingerprint[:19]}…, "
            f"but the loaded base is {net.base_fingerprint[:19]}…; load the base model it was trained "
            f"on (params.yaml base.weights) or retrain the patch on this base"
        )
    try:
        tensors = load_file(str(patch_dir / TENSORS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise PatchFormatError(f"{patch_dir / TENSORS_FILE}: cannot read tensors ({exc}); re-export the patch") from None
    name = task or meta.task
    net.add_task(name, len(meta.class_names), make_config(meta.delta_kind, meta.delta_config))
    try:
        net.load_task_state_dict(name, tensors)
    except Exception:
        net.remove_task(name)
        raise
    return meta
