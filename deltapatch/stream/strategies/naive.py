"""`naive`: sequential fine-tuning of one shared network, one head per task.

Each new task trains the whole backbone and its own new head with plain cross-entropy; nothing
protects what earlier tasks need, so their accuracy drops (catastrophic forgetting). The base task
is served by the base head on the current backbone. EWC, LwF, replay and sequential PAINT are this
strategy plus one ingredient each.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from torch import nn

from deltapatch.baselines.base import Forward
from deltapatch.data.dataset import TaskData
from deltapatch.delta.routing import BASE
from deltapatch.stream.strategies.base import (
    MultiHeadModel,
    Strategy,
    TaskModule,
    multi_head_copy,
    save_model,
)
from deltapatch.train import Trainable


class NaiveFineTune(Strategy):
    name = "naive"
    # Strategies whose loss reaches the old heads (LwF's distillation, replayed samples) train them too.
    trains_old_heads: ClassVar[bool] = False

    model: MultiHeadModel

    def start(self, base: TaskData) -> None:
        self.model = multi_head_copy(self.context.base.model)

    def prepare(self, data: TaskData) -> Trainable:
        self.tasks.append(data.name)
        self.model.add_head(data.name, data.num_classes)
        for task, head in self.model.heads.items():
            head.requires_grad_(task == data.name or self.trains_old_heads)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return Trainable(self.task_module(data), parameters, self.model.state_dict, self.model.load_state_dict)

    def task_module(self, data: TaskData) -> TaskModule:
        """The module `fit` trains on `data` (subclasses add their loss term here)."""
        return TaskModule(self.model, data.name)

    def forward(self, task: str) -> Forward:
        model = self.model.eval()
        return lambda x: model.logits(x, task)

    def head(self, task: str) -> nn.Linear:
        return self.model.head(task)

    def save(self, folder: Path) -> None:
        # One network serves every task: the backbone and all heads (BASE's included).
        save_model(self.model, folder)

    def seen_tasks(self) -> list[str]:
        return [BASE, *self.tasks]
