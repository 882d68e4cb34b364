"""The interface every continual-learning strategy implements, and the pieces they share.

A `Strategy` learns the tasks of a stream one after another, in the task-incremental setting (the
task identity is known at inference). The runner drives every strategy through the same steps:

    strategy = STRATEGIES[name](context, settings)
    strategy.start(base_data)                 # task 0 = the base task, learned by pre-training
    for data in patch tasks:
        trainable = strategy.prepare(data)    # add the task (head, patch, adapter); what `fit` trains
        fit(trainable, data, ...)             # the one training loop (deltapatch.train.fit)
        strategy.after_fit(data)              # e.g. EWC importances, PAINT's α, the replay buffer
        strategy.save(store)                  # everything kept to serve every task so far, on disk
        strategy.forward(task)(x)             # evaluate any task seen so far (BASE = the base task)

Every forward maps normalised images (N, 3, H, W) to the task's logits (N, K_task).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from deltapatch.baselines.base import Forward, replace_module, save_tensors, split_head
from deltapatch.data.dataset import TaskData
from deltapatch.delta.routing import BASE
from deltapatch.models.base import BaseModel
from deltapatch.train import Normalizer, Trainable


@dataclass
class StreamContext:
    """What every strategy shares on one stream run."""

    params: dict[str, Any]
    base: BaseModel  # the pristine pre-trained base (never modified: strategies copy or wrap a copy)
    norm: Normalizer
    device: torch.device
    batch_size: int  # train.batch_size: also the batch of importance passes and replay draws
    seed: int


@dataclass
class StrategySettings:
    """Per-strategy options from params.yaml `stream.strategy_options.<name>`; `lr` overrides train.lr."""

    lr: float | None = None


class Strategy:
    """One way of learning a stream of tasks. Subclasses set `name` and `settings_class`."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type[StrategySettings]] = StrategySettings

    def __init__(self, context: StreamContext, settings: StrategySettings | None = None) -> None:
        self.context = context
        self.settings = settings or self.settings_class()
        self.tasks: list[str] = []  # patch tasks learned so far, in order (the base task is BASE)

    def start(self, base: TaskData) -> None:
        """Take the pre-trained base model as the learner of task 0 (the base task)."""
        raise NotImplementedError

    def prepare(self, data: TaskData) -> Trainable:
        """Add task `data.name` (its head at initialisation) and return what `fit` trains."""
        raise NotImplementedError

    def after_fit(self, data: TaskData) -> None:
        """Work after training on `data` (default: nothing); it counts as training time."""

    def forward(self, task: str) -> Forward:
        """The serving path of `task` (BASE for the base task), eval mode."""
        raise NotImplementedError

    def head(self, task: str) -> nn.Linear:
        """The classifier of `task` (for forward transfer: read right after `prepare`, untrained)."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write (or update) in `folder` every file this strategy must keep to serve all tasks so far
        and to go on learning; the runner counts their bytes on disk."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Strategy-specific facts for stream.md (default: none)."""
        return []


# ---------------------------------------------------------------- a shared backbone with one head per task
class MultiHeadModel(nn.Module):
    """A backbone shared by every task and one linear head per task (task-incremental learning).

    `heads[BASE]` is the base model's own classifier. `logits(x, task)`: (N, 3, H, W) → (N, K_task).
    """

    def __init__(self, backbone: nn.Module, base_head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({BASE: base_head})

    def add_head(self, task: str, num_classes: int) -> nn.Linear:
        base_head = self.head(BASE)
        head = nn.Linear(base_head.in_features, num_classes).to(base_head.weight.device)
        self.heads[task] = head
        return head

    def head(self, task: str) -> nn.Linear:
        head = self.heads[task]
        assert isinstance(head, nn.Linear)  # add_head puts nothing else here
        return head

    def logits(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.backbone(x))


def multi_head_copy(base_model: nn.Module) -> MultiHeadModel:
    """A fully trainable copy of `base_model` as a MultiHeadModel (the original is untouched)."""
    backbone = copy.deepcopy(base_model)
    name, head = split_head(backbone)
    replace_module(backbone, name, nn.Identity())
    for param in backbone.parameters():
        param.requires_grad_(True)
    for param in head.parameters():
        param.requires_grad_(False)  # the base head is never trained by a later task
    return MultiHeadModel(backbone, head)


class TaskModule(nn.Module):
    """What `fit` calls for one task of a MultiHeadModel: forward = that task's logits, plus (in
    training mode) the strategy's extra loss term, added with `add_to_loss`."""

    def __init__(self, model: MultiHeadModel, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.backbone(x)
        logits = self.model.heads[self.task](features)
        if self.training:
            extra = self.extra_loss(x, features)
            if extra is not None:
                return add_to_loss(logits, extra)
        return logits

    def extra_loss(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        """The strategy's regulariser for this batch (None: plain cross-entropy)."""
        return None


class _AddToLoss(torch.autograd.Function):
    """Identity on the logits whose backward also sends gradient 1 to a scalar `extra`."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.extra_meta = (extra.dtype, extra.device)
        return logits.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, device = ctx.extra_meta
        return grad, torch.ones((), dtype=dtype, device=device)


def add_to_loss(logits: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """`logits`, unchanged in value, such that whatever loss the training loop builds from them
    backpropagates as `loss + extra`: `fit` computes cross-entropy and calls backward once, so the
    parameters receive ∂(CE + extra)/∂θ exactly (`fit`'s reported train_loss shows CE alone).

    This is how EWC, LwF and replay add their terms while training through the one loop
    (`deltapatch.train.fit`) without a loss hook in it. It assumes the loop backpropagates the
    unscaled loss (true of `fit`: bf16 autocast, no gradient scaler); tests/stream check it.
    """
    return _AddToLoss.apply(logits, extra)


def save_model(model: nn.Module, folder: Path, name: str = "model.safetensors") -> None:
    save_tensors(model.state_dict(), Path(folder) / name)
