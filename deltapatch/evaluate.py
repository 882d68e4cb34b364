"""Evaluation shared by training, the gate, the registry and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltapatch.data.dataset import Split
from deltapatch.delta.network import DeltaNetwork
from deltapatch.delta.routing import BASE
from deltapatch.train import Normalizer, accuracy, predict_logits


@dataclass
class BaseCheck:
    """The base route of a patched network compared with the pristine base model."""

    bit_identical: bool
    max_abs_diff: float
    base_acc: float
    pristine_acc: float

    @property
    def acc_change(self) -> float:
        return self.base_acc - self.pristine_acc


def pristine_logits(model: nn.Module, split: Split, norm: Normalizer) -> torch.Tensor:
    model.eval()
    return predict_logits(model, split, norm)


def base_check(net: DeltaNetwork, reference_logits: torch.Tensor, split: Split, norm: Normalizer) -> BaseCheck:
    """Route `split` through the base path of `net` and compare with the reference logits."""
    previous = net.active_task
    net.eval().select(BASE)
    try:
        logits = predict_logits(net, split, norm, desc="base check")
    finally:
        net.select(previous)
    diff = float((logits - reference_logits).abs().max()) if len(logits) else 0.0
    return BaseCheck(
        bit_identical=torch.equal(logits, reference_logits),
        max_abs_diff=diff,
        base_acc=accuracy(logits, split.labels),
        pristine_acc=accuracy(reference_logits, split.labels),
    )


def task_accuracy(net: DeltaNetwork, task: str, split: Split, norm: Normalizer) -> float:
    previous = net.active_task
    net.eval().select(task)
    try:
        return accuracy(predict_logits(net, split, norm, desc=f"eval {task}"), split.labels)
    finally:
        net.select(previous)
