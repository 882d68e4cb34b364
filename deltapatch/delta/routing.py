"""Task routing shared by every wrapped layer of a DeltaNetwork.

A route is either one task for the whole batch, or a mixed batch: a list of (task, sample
indices) groups. Layers read the route from a `Router` object the network owns, so switching task
costs one attribute write, not a walk over the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltapatch.task_names import BASE_TASK

BASE = BASE_TASK  # the route to the untouched base model (a reserved task name)


@dataclass
class Router:
    """Current routing. `groups` is None for a single-task batch, else [(task, (n_t,) indices)]."""

    task: str = BASE
    groups: list[tuple[str, torch.Tensor]] | None = None
    merged: str | None = None  # task whose Δ is folded into the frozen weights, if any
    known_tasks: set[str] = field(default_factory=set)

    @property
    def is_mixed(self) -> bool:
        return self.groups is not None
