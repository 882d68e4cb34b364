"""Deterministic stratified train/val/test splits shared by ingestion, the demo suite and the bench."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def stratified_split(labels: np.ndarray | Sequence[int] | Sequence[str], val: float, test: float, seed: int) -> np.ndarray:
    """Assign each sample to 'train', 'val' or 'test', class by class.

    Args:
        labels: (N,) class index (or any hashable label) per sample.
        val, test: fractions of each class for validation and test.
        seed: same seed and labels → same assignment, on every machine.

    Returns:
        (N,) array of split names. Every class with at least 3 samples gets at least one sample
        in each split, so per-split accuracies are always defined.
    """
    labels = np.asarray(labels)
    out = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for cls in sorted(set(labels.tolist()), key=str):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        n_test = max(1, round(n * test)) if n >= 3 else 0
        n_val = max(1, round(n * val)) if n >= 3 else 0
        out[idx[:n_test]] = "test"
        out[idx[n_test : n_test + n_val]] = "val"
        out[idx[n_test + n_val :]] = "train"
    return out
