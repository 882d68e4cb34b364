"""`bn-patch` ("K for the price of 1", Mudrakarta et al. 2019): per-task BatchNorms + a new head.

The conv weights are shared with the base model (the same tensors); each task owns a copy of every
BatchNorm (affine trained, running statistics its own) and a head. The base route swaps the base
BatchNorms and the base head back in, i.e. it is the pristine base model itself.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

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


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


class BNPatch(Method):
    name = "bn-patch"

    model: Classifier

    def prepare(self, data: TaskData) -> Trainable:
        self.task = data.name
        base_model = self.context.base.model
        _, base_head = split_head(base_model)
        # Share everything except the BatchNorms, which get their own tensors for this task.
        backbone = shared_copy(base_model, share=lambda module: not is_batchnorm(module))
        for name, param in backbone.named_parameters():
            param.requires_grad_(is_batchnorm(backbone.get_submodule(name.rpartition(".")[0])))
        self.model = classifier_from(backbone, data.num_classes, base_head, self.context.device)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        groups = {"norm": [p for p in self.model.backbone.parameters() if p.requires_grad],
                  "head": list(self.model.head.parameters())}
        return Trainable(self.model, trained, self.task_state_dict, self.load_task_state_dict, groups)

    def task_state_dict(self) -> dict:
        """What the task owns: every BatchNorm's affine + statistics, and the head."""
        state = {f"head.{k}": v for k, v in self.model.head.state_dict().items()}
        for name, module in self.model.backbone.named_modules():
            if is_batchnorm(module):
                state.update({f"backbone.{name}.{k}": v for k, v in module.state_dict().items()})
        return state

    def load_task_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state, strict=False)

    def task_forward(self) -> Forward:
        return self.model.eval()

    def base_forward(self) -> Forward:
        # Serving the base task = base BatchNorms + base head on the shared convs = the base model.
        return self.context.base.model.eval()

    def save(self, out_dir: Path) -> int:
        return save_tensors(self.task_state_dict(), Path(out_dir) / "bn_patch.safetensors")

    def trainable_params(self) -> int:
        return count_trainable(self.model)
