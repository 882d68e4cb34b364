"""Task routing shared by every wrapped layer of a DeltaNetwork.

A route is either one task for the whole batch, or a mixed batch: each sample names its own task.
Layers read the route from a `Router` object the network owns, so switching task costs one
attribute write, not a walk over the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from deltapatch.task_names import BASE_TASK

BASE = BASE_TASK  # the route to the untouched base model (a reserved task name)


@dataclass(frozen=True)
class Segments:
    """P patched samples regrouped by task, for kernels that read each task's weights once: the
    `present` tasks side by side and up to `depth` samples of each, a (depth, len(present)) grid
    flattened row-major. Cells beyond a task's own samples repeat a real sample (their outputs
    are computed and never read), so no zero padding is built."""

    present: torch.Tensor  # (G,) the distinct task slots, in first-seen order
    depth: int             # the most samples of one task
    source: torch.Tensor   # (depth·G,) the sample (index into the batch) in each cell
    cell: torch.Tensor     # (P,) each patched sample's cell

    @property
    def cells(self) -> int:
        return self.depth * len(self.present)


# A grid with more cells than this many times the samples (one task with most of the batch beside
# others with one sample each) computes mostly repeats: then the per-sample form is cheaper.
SEGMENT_WASTE = 2


@dataclass(frozen=True)
class PatchedRows:
    """Samples `rows` of a batch and each one's task as a slot of a layer's stacks."""

    rows: torch.Tensor   # (P,) indices into the batch
    slots: torch.Tensor  # (P,)

    @cached_property
    def segments(self) -> Segments | None:
        """These samples by task (see Segments), or None where the grid would waste more than
        SEGMENT_WASTE× the samples' work."""
        slots, rows = self.slots.tolist(), self.rows.tolist()
        column = {slot: j for j, slot in enumerate(dict.fromkeys(slots))}
        filled = [0] * len(column)
        cells = []
        for slot in slots:
            cells.append(filled[column[slot]] * len(column) + column[slot])
            filled[column[slot]] += 1
        depth = max(filled, default=0)
        if depth * len(column) > SEGMENT_WASTE * len(slots):
            return None
        source = [rows[0]] * (depth * len(column))
        for row, cell in zip(rows, cells, strict=True):
            source[cell] = row
        device = self.rows.device
        return Segments(torch.tensor(list(column), device=device), depth, torch.tensor(source, device=device),
                        torch.tensor(cells, device=device))


@dataclass(frozen=True)
class MixedBatch:
    """One mixed-task batch of N samples, in the forms the wrapped layers use.

    Stacked layers (a fixed number of kernels per layer whatever the number of tasks) read
    `route`, `patched` and `base`; the per-task loop (Δ kinds and norm layers without a
    stacked form) reads `groups`, built only when such a layer asks for it.
    """

    tasks: tuple[str, ...]   # the distinct tasks of the batch, in first-seen order
    task_routes: tuple[int, ...]  # each one's route value (below)
    route: torch.Tensor      # (N,) 0 for a base sample, 1 + its task's slot in Router.order otherwise
    patched: PatchedRows     # the P samples routed to a patch, each with its task's slot in Router.order
    base: torch.Tensor       # (N - P,) indices of the base samples

    @classmethod
    def build(cls, tasks: list[str], order: tuple[str, ...], device: torch.device) -> MixedBatch:
        routes = {task: 0 if task == BASE else 1 + order.index(task) for task in dict.fromkeys(tasks)}
        route = torch.tensor([routes[t] for t in tasks], device=device)
        patched = torch.nonzero(route > 0).flatten()
        return cls(tuple(routes), tuple(routes.values()), route, PatchedRows(patched, route[patched] - 1),
                   torch.nonzero(route == 0).flatten())

    @cached_property
    def groups(self) -> list[tuple[str, torch.Tensor]]:
        """(task, its sample indices) for each task of the batch, the base included."""
        return [(task, torch.nonzero(self.route == value).flatten())
                for task, value in zip(self.tasks, self.task_routes, strict=True)]


@dataclass
class Router:
    """Current routing: one `task` for the whole batch, or a `mixed` batch.

    `order` is the tasks' slot order in the layers' stacked tensors; `version` changes whenever
    a patch may have changed (added, removed, loaded, trained), which tells the layers to rebuild
    their stacks before the next mixed batch."""

    task: str = BASE
    mixed: MixedBatch | None = None
    merged: str | None = None  # task whose Δ is folded into the frozen weights, if any
    order: tuple[str, ...] = ()
    version: int = 0
