"""Continual-learning numbers from an accuracy matrix, as Avalanche and GEM define them.

R[i][j] is the test accuracy on task j after training on task i (tasks in stream order, the base
task first: row 0 is the pre-trained base model before any arrival). Only j ≤ i is defined in the
task-incremental setting here: a task's head does not exist before the task arrives.

With T tasks (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"; Avalanche's
`StreamAccuracy`, `StreamBWT` and `StreamForwardTransfer` on the whole stream):

- ACC = (1/T) Σ_j R[T-1][j]                         — mean final accuracy over every task;
- BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] − R[j][j])     — final minus just-learned accuracy, averaged
  over every task but the last; < 0 is forgetting (Avalanche's `Forgetting` is −BWT per task);
- FWT = 1/(T-1) Σ_{j≥1} (R[j-1][j] − b_j)           — accuracy on task j just *before* training on it
  minus the accuracy b_j of the model at initialisation (Avalanche: "after the previous experience
  has been trained on, and random initialization before training").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class AccuracyMatrix:
    """Lower-triangular R as rows: rows[i][j] for j ≤ i. `tasks` names the columns."""

    tasks: list[str]
    rows: list[list[float]]

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != i + 1:
                raise ValueError(f"accuracy matrix row {i} has {len(row)} entries; expected {i + 1} (tasks 0..{i})")
        if len(self.rows) > len(self.tasks):
            raise ValueError(f"{len(self.rows)} rows for {len(self.tasks)} tasks")

    @property
    def size(self) -> int:
        """Number of tasks seen so far (rows filled)."""
        return len(self.rows)

    def final(self) -> list[float]:
        return list(self.rows[-1]) if self.rows else []


def average_accuracy(matrix: AccuracyMatrix) -> float:
    """ACC: mean accuracy over every task seen, after the last one."""
    final = matrix.final()
    return sum(final) / len(final) if final else math.nan


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """BWT: mean over tasks j < T-1 of R[T-1][j] − R[j][j]; NaN with fewer than two tasks."""
    t = matrix.size
    if t < 2:
        return math.nan
    final = matrix.rows[-1]
    return sum(final[j] - matrix.rows[j][j] for j in range(t - 1)) / (t - 1)


def forgetting(matrix: AccuracyMatrix) -> list[float]:
    """Avalanche's per-task Forgetting: R[j][j] − R[T-1][j] for every task but the last."""
    final = matrix.rows[-1] if matrix.rows else []
    return [matrix.rows[j][j] - final[j] for j in range(matrix.size - 1)]


def forward_transfer(before: Sequence[float], at_init: Sequence[float]) -> float:
    """FWT from before[k] = R[k][k+1] (task k+1 evaluated just before its training) and
    at_init[k] = b_{k+1} (the same task on the model at initialisation); NaN when empty."""
    if len(before) != len(at_init):
        raise ValueError(f"forward transfer needs as many 'before' ({len(before)}) as 'at init' ({len(at_init)}) values")
    if not before:
        return math.nan
    return sum(b - r for b, r in zip(before, at_init, strict=True)) / len(before)
