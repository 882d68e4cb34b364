"""`replay`: experience replay with a buffer of M images per task (`mem_per_task`).

After each task (the base task included, at the start) M class-balanced training images of it go
into the buffer, with their labels. Every training mini-batch of a new task is joined by as many
buffer samples, drawn uniformly, as in Avalanche's `ReplayPlugin` (memory batch = batch size,
one forward over the concatenation); each replayed sample is scored by its own task's head and
their mean cross-entropy is added to the new task's. The buffer is stored with the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deltapatch.baselines.base import save_tensors
from deltapatch.data.dataset import Split, TaskData
from deltapatch.delta.routing import BASE
from deltapatch.stream.strategies.base import MultiHeadModel, StrategySettings, TaskModule, add_to_loss
from deltapatch.stream.strategies.naive import NaiveFineTune
from deltapatch.train import Trainable


@dataclass
class ReplaySettings(StrategySettings):
    mem_per_task: int = 50  # images kept per task


class Replay(NaiveFineTune):
    name = "replay"
    settings_class = ReplaySettings
    settings: ReplaySettings
    trains_old_heads = True

    def start(self, base: TaskData) -> None:
        super().start(base)
        self.buffer: dict[str, Split] = {}
        self.remember(BASE, base.train)

    def prepare(self, data: TaskData) -> Trainable:
        trainable = super().prepare(data)
        self.draws = torch.Generator().manual_seed(self.context.seed + len(self.tasks))
        self.pool_images = torch.cat([s.images for s in self.buffer.values()])
        self.pool_labels = torch.cat([s.labels for s in self.buffer.values()])
        self.pool_tasks = [task for task, s in self.buffer.items() for _ in range(len(s))]
        return trainable

    def after_fit(self, data: TaskData) -> None:
        self.remember(data.name, data.train)

    def remember(self, task: str, split: Split) -> None:
        self.buffer[task] = balanced_sample(split, int(self.settings.mem_per_task), self.context.seed)

    def task_module(self, data: TaskData) -> TaskModule:
        return _ReplayModule(self.model, data.name, self)

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """`count` buffer samples drawn uniformly (with replacement across batches, not within one)."""
        index = torch.randperm(len(self.pool_labels), generator=self.draws)[:count]
        return self.pool_images[index], self.pool_labels[index], [self.pool_tasks[int(i)] for i in index]

    def save(self, folder: Path) -> None:
        super().save(folder)
        for task, split in self.buffer.items():
            path = Path(folder) / "buffer" / f"{task}.safetensors"
            if not path.is_file():
                save_tensors({"images": split.images, "labels": split.labels}, path)


class _ReplayModule(TaskModule):
    def __init__(self, model: MultiHeadModel, task: str, strategy: Replay) -> None:
        super().__init__(model, task)
        self.strategy = strategy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        images, labels, tasks = self.strategy.draw(x.shape[0])
        norm = self.strategy.context.norm
        features = self.model.backbone(torch.cat([x, norm(images).to(x.dtype)]))
        logits = self.model.heads[self.task](features[: len(x)])
        memory = features[len(x):]
        labels = labels.to(memory.device)
        loss = torch.zeros((), device=memory.device)
        for task in dict.fromkeys(tasks):
            rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=memory.device)
            loss = loss + F.cross_entropy(self.model.heads[task](memory[rows]).float(), labels[rows], reduction="sum")
        return add_to_loss(logits, loss / len(tasks))


def balanced_sample(split: Split, count: int, seed: int) -> Split:
    """`count` images of `split` (all if fewer), taken round-robin over its classes in a seeded order."""
    rng = np.random.default_rng(seed)
    labels = split.labels.numpy()
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(labels)):
        picked += [int(pool[depth]) for pool in pools if depth < len(pool)][: count - len(picked)]
        depth += 1
    index = torch.from_numpy(np.sort(np.array(picked, dtype=np.int64)))
    return Split(split.images[index], split.labels[index])
