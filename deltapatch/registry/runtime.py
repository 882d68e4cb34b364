"""Inference on a base model plus any number of patches: used by the pyfunc model, `predict` and `serve`.

    predictor = Predictor(base)                      # a loaded BaseModel
    predictor.add_patch(patch_dir)                   # fingerprint checked (FingerprintMismatch)
    predictor.predict(images_nhwc_uint8, ["base", "shapes", ...])   # ONE mixed-batch forward
"""

from __future__ import annotations

import ctypes
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltapatch.data.images import DEFAULT_MAX_PIXELS, encode_png, load_pixels, read_image_files
from deltapatch.delta import DeltaNetwork
from deltapatch.delta.patch import PatchMeta, load_patch, read_patch_meta
from deltapatch.errors import DeltapatchError, FingerprintMismatch, RegistryError
from deltapatch.models.base import BaseModel, load_base, sidecar_path
from deltapatch.train import Normalizer

BASE = "base"


def load_base_files(weights: Path, device: torch.device | str = "cpu") -> BaseModel:
    """Load a base from its weights file and the sidecar JSON beside it (as registered)."""
    weights = Path(weights).resolve()
    sidecar = sidecar_path(weights)
    if not sidecar.is_file():
        raise DeltapatchError(f"{sidecar} not found: a registered base holds its weights and sidecar JSON")
    settings = dict(json.loads(sidecar.read_text())["settings"])
    settings["weights"] = str(weights)
    return load_base({"base": settings, "_root": str(weights.parent)}, device)


@dataclass
class LoadedPatch:
    task: str
    meta: PatchMeta
    version: str = ""
    patch_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """A base model with patches loaded for mixed-batch inference. Thread-safe."""

    def __init__(self, base: BaseModel, device: torch.device | str | None = None) -> None:
        self.base = base
        self.device = torch.device(device) if device is not None else next(base.model.parameters()).device
        self.net = DeltaNetwork(base.model).eval()
        self.norm = Normalizer(base.settings.mean, base.settings.std, self.device)
        self.patches: dict[str, LoadedPatch] = {}
        self.lock = threading.RLock()

    @property
    def fingerprint(self) -> str:
        return self.net.base_fingerprint

    @property
    def input_size(self) -> int:
        return int(self.base.settings.input_size)

    def class_names(self, task: str) -> list[str]:
        return list(self.base.class_names) if task == BASE else list(self.patches[task].meta.class_names)

    def tasks(self) -> list[str]:
        return [BASE, *self.patches]

    def add_patch(self, patch_dir: Path, version: str = "", info: dict[str, Any] | None = None,
                  task: str | None = None) -> LoadedPatch:
        """Load (or replace) the patch in `patch_dir`. It is swapped in only once it loaded completely:
        a patch for another base, unreadable files or tensors that do not fit raise, and the version
        of that task loaded before (if any) keeps serving, restored from memory.

        `task` (else `info["task"]`, the task of the registered model the version came from) is the
        task the caller means to load: a patch.json naming another task is refused (RegistryError
        naming both) before anything is touched, since it would replace that other task's patch."""
        meta = read_patch_meta(patch_dir)
        expected = task if task is not None else (info or {}).get("task")
        if expected and expected != meta.task:
            where = f" ({info['model_name']})" if info and info.get("model_name") else ""
            raise RegistryError(
                f"version {version or '?'}{where} is registered for task '{expected}', but its patch.json names "
                f"task '{meta.task}'; refused (it would replace the patch of '{meta.task}')"
            )
        if meta.base_fingerprint != self.fingerprint:
            raise FingerprintMismatch(
                f"patch '{meta.task}' version {version or '?'} was trained on base {meta.base_fingerprint[:19]}…, "
                f"but the running base is {self.fingerprint[:19]}…; refused (retrain it on this base or "
                f"serve the base it was made for)"
            )
        with self.lock:  # no forward sees the task half-loaded
            previous = self.patches.get(meta.task)
            kept = None
            if meta.task in self.net.tasks:
                # The tensors stay alive in this dict after remove_task: the restore needs no files.
                kept = (self.net.task_configs[meta.task], self.net.task_state_dict(meta.task))
                self.net.remove_task(meta.task)
            try:
                load_patch(self.net, patch_dir)
            except Exception:
                if meta.task in self.net.tasks:
                    self.net.remove_task(meta.task)
                if kept is not None and previous is not None:
                    config, state = kept
                    self.net.add_task(meta.task, len(previous.meta.class_names), config)
                    self.net.load_task_state_dict(meta.task, state)
                    self.net.eval()
                raise
            loaded = LoadedPatch(meta.task, meta, str(version), Path(patch_dir), dict(info or {}))
            self.patches[meta.task] = loaded
            self.net.eval()
            return loaded

    def _logits(self, x: torch.Tensor, tasks: list[str], group_from: int) -> torch.Tensor:
        """(N, K) logits, rows beyond a task's class count unspecified (callers slice them off)."""
        names = list(dict.fromkeys(tasks))
        if group_from <= 0 or len(x) < group_from or len(names) == 1:
            return self.net(x, tasks=tasks).float().cpu()
        rows = {}
        for task in names:
            index = torch.tensor([i for i, t in enumerate(tasks) if t == task])
            rows[task] = (index, self.net(x[index], tasks=[task] * len(index)).float().cpu())
        out = torch.full((len(x), max(r.shape[1] for _, r in rows.values())), float("-inf"))
        for index, logits in rows.values():
            out[index, : logits.shape[1]] = logits
        return out

    def remove_patch(self, task: str) -> None:
        with self.lock:
            if task in self.net.tasks:
                self.net.remove_task(task)
            self.patches.pop(task, None)

    def prepare(self) -> None:
        """Rebuild the stacked tensors of mixed batches for the patches loaded now, under the lock
        (no forward sees a half-built set, none pays for the build), then hand the freed old stacks'
        pages back to the OS. A caller that may have changed the served set calls it once at the end
        (the champion poll, every poll): nothing is rebuilt or trimmed when nothing changed."""
        with self.lock:
            rebuilt = self.net.prepare_mixed()
        if rebuilt:
            release_freed_memory()

    @torch.inference_mode()
    def predict(self, images: np.ndarray | torch.Tensor, tasks: list[str] | str,
                group_from: int = 0) -> list[dict[str, Any]]:
        """images: (N, H, W, 3) uint8 (NHWC, as decoded) → per image {task, class, class_index, score, scores}.

        One mixed-task forward; with `group_from` > 0, a batch of at least that many images runs one
        single-task forward per task instead (the same classes; scores equal within float rounding,
        since the mixed forward's stacked kernels round differently from a single task's). The
        mixed forward is the faster at every batch size measured (docs/serving.md), hence 0 by default.
        """
        x = torch.as_tensor(np.asarray(images))
        if x.dim() != 4 or x.shape[-1] != 3:
            raise DeltapatchError(f"expected images of shape (N, H, W, 3), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise DeltapatchError(f"expected uint8 images, got {x.dtype}")
        if isinstance(tasks, str):
            tasks = [tasks] * x.shape[0]
        with self.lock:
            unknown = sorted({t for t in tasks if t != BASE and t not in self.patches})
            if unknown:
                raise DeltapatchError(f"no patch loaded for task(s) {unknown}; loaded: {self.tasks()}")
            if x.shape[0] == 0:
                return []
            logits = self._logits(self.norm(x.permute(0, 3, 1, 2).contiguous()), list(tasks), group_from)
            results = []
            for row, task in zip(logits, tasks, strict=True):
                names = self.class_names(task)
                probs = torch.softmax(row[: len(names)], dim=0)
                index = int(probs.argmax())
                results.append({
                    "task": task,
                    "version": self.patches[task].version if task != BASE else "",
                    "class": names[index],
                    "class_index": index,
                    "score": float(probs[index]),
                    "scores": {name: float(p) for name, p in zip(names, probs, strict=True)},
                })
            return results


def release_freed_memory() -> None:
    """glibc keeps freed heap pages in the process (a swapped-out patch set would stay resident);
    malloc_trim hands them back. A no-op where the C library is not glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already has loaded
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return
    trim(0)


def decode_image(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image file bytes → (size, size, 3) uint8 through the one image pipeline (as at training time).

    Raises ImageError (a DeltapatchError): ImageTooLarge or UnreadableImage, saying why.
    """
    return load_pixels(data, size, max_pixels)


__all__ = ["BASE", "LoadedPatch", "Predictor", "decode_image", "encode_png", "load_base_files", "read_image_files"]
