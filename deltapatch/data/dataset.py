"""In-memory image datasets: the whole task as uint8 tensors (the tasks here are small).

A `TaskData` is the unit every trainer, evaluator and benchmark consumes, whatever the source:
the built-in suite (`builtin.py`) or an ingested task folder with a manifest.csv.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from deltapatch.data.images import DEFAULT_MAX_PIXELS, ImageError, load_pixels, read_image_files
from deltapatch.data.splits import SPLITS, stratified_split
from deltapatch.errors import DatasetError


@dataclass
class Split:
    """images: (N, 3, H, W) uint8; labels: (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def limit_per_class(self, max_per_class: int, seed: int) -> Split:
        """A deterministic class-balanced subset with at most `max_per_class` samples per class."""
        if not len(self):
            return self
        rng = np.random.default_rng(seed)
        labels = self.labels.numpy()
        keep = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in np.unique(labels)]
        index = torch.from_numpy(np.sort(np.concatenate(keep)))
        return Split(self.images[index], self.labels[index])


@dataclass
class TaskData:
    """A task with its class names and train/val/test splits."""

    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def from_arrays(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    val: float,
    test: float,
    seed: int,
) -> TaskData:
    """Split (N, H, W, 3) uint8 images with (N,) labels into a TaskData, stratified by class."""
    assignment = stratified_split(labels, val, test, seed)
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    target = torch.from_numpy(labels.astype(np.int64))
    splits = {s: Split(tensor[assignment == s], target[assignment == s]) for s in SPLITS}
    return TaskData(name, class_names, splits["train"], splits["val"], splits["test"])


def load_task_dir(task_dir: Path, image_size: int, name: str | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> TaskData:
    """Read an ingested task folder (`manifest.csv` with path,class,split,sha256) into memory.

    Images go through the one image pipeline (deltapatch/data/images.py), like at serving time.
    """
    task_dir = Path(task_dir)
    manifest_path = task_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise DatasetError(f"{manifest_path} not found; ingest the dataset first (deltapatch ingest PATH)")
    manifest = pd.read_csv(manifest_path, dtype=str)
    class_names = sorted(manifest["class"].unique())
    index = {c: i for i, c in enumerate(class_names)}
    splits = {}
    for split in SPLITS:
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            raise DatasetError(f"{manifest_path}: no '{split}' images; re-ingest the task")
        images = np.stack([_read_pixels(task_dir / p, image_size, max_pixels) for p in rows["path"]])
        labels = np.array([index[str(c)] for c in rows["class"]], dtype=np.int64)
        splits[split] = Split(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
    return TaskData(name or task_dir.name, class_names, splits["train"], splits["val"], splits["test"])


def _read_pixels(path: Path, size: int, max_pixels: int) -> np.ndarray:
    try:
        return load_pixels(path, size, max_pixels)
    except ImageError as exc:
        raise DatasetError(f"{path}: {exc}; re-ingest the task (deltapatch ingest PATH)") from None


def read_images(paths: list[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Load image files for prediction: → (N, 3, size, size) uint8."""
    arrays = read_image_files([Path(p) for p in paths], size, max_pixels)
    return torch.from_numpy(arrays.transpose(0, 3, 1, 2).copy())
