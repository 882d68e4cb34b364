"""`full-ft`: fine-tune every weight of a copy of the base model, one full copy per task.

There is one set of backbone weights and no routing, so asked for the base task it serves the
fine-tuned backbone with the ORIGINAL base head: its base accuracy shows the forgetting.
"""

from __future__ import annotations

import copy
from pathlib import Path

from deltapatch.baselines.base import (
    Classifier,
    Forward,
    Method,
    classifier_from,
    count_trainable,
    save_tensors,
    split_head,
    trainable_of,
)
from deltapatch.data.dataset import TaskData
from deltapatch.train import Trainable


class FullFineTune(Method):
    name = "full-ft"
    training_key = "full-ft"  # PAINT (a subclass) trains exactly like this, then interpolates

    model: Classifier

    def prepare(self, data: TaskData) -> Trainable:
        self.task = data.name
        self.model = self.build(data)
        return trainable_of(self.model)

    def build(self, data: TaskData) -> Classifier:
        """A fully trainable copy of the base with a fresh head of data.num_classes outputs."""
        base_model = self.context.base.model
        _, base_head = split_head(base_model)
        backbone = copy.deepcopy(base_model)
        for param in backbone.parameters():
            param.requires_grad_(True)
        return classifier_from(backbone, data.num_classes, base_head, self.context.device)

    def task_forward(self) -> Forward:
        return self.model.eval()

    def base_forward(self) -> Forward:
        self.model.eval()
        return self.model.forward_base

    def save(self, out_dir: Path) -> int:
        # What a user ships per task: the whole fine-tuned model (backbone + task head).
        return save_tensors(self.model.state_dict(), Path(out_dir) / "model.safetensors")

    def trainable_params(self) -> int:
        return count_trainable(self.model)
