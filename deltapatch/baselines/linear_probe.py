"""`linear-probe`: train only a new head on the frozen backbone (BatchNorm stays in eval mode).

The base route is the original head on the unchanged backbone, so the base task cannot change.
"""

from __future__ import annotations

from pathlib import Path

from deltapatch.baselines.base import (
    Classifier,
    Forward,
    Method,
    classifier_from,
    count_trainable,
    save_tensors,
    shared_copy,
    split_head,
)
from deltapatch.data.dataset import TaskData
from deltapatch.train import Trainable


class FrozenBackboneClassifier(Classifier):
    """A Classifier whose backbone never leaves eval mode: BN statistics are not updated."""

    def train(self, mode: bool = True) -> FrozenBackboneClassifier:
        super().train(mode)
        self.backbone.eval()
        return self


class LinearProbe(Method):
    name = "linear-probe"

    model: Classifier

    def prepare(self, data: TaskData) -> Trainable:
        self.task = data.name
        base_model = self.context.base.model
        _, base_head = split_head(base_model)
        backbone = shared_copy(base_model, share=lambda module: True)  # same tensors, no copy
        model = classifier_from(backbone, data.num_classes, base_head, self.context.device, FrozenBackboneClassifier)
        for param in model.backbone.parameters():
            param.requires_grad_(False)
        self.model = model
        head = model.head
        return Trainable(
            module=model,
            parameters=list(head.parameters()),
            state_dict=head.state_dict,
            load_state_dict=head.load_state_dict,
            groups={"head": list(head.parameters())},
        )

    def task_forward(self) -> Forward:
        return self.model.eval()

    def base_forward(self) -> Forward:
        self.model.eval()
        return self.model.forward_base

    def save(self, out_dir: Path) -> int:
        return save_tensors(self.model.head.state_dict(), Path(out_dir) / "head.safetensors")

    def trainable_params(self) -> int:
        return count_trainable(self.model.head)
