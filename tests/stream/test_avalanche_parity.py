"""Our EWC importances and LwF distillation equal Avalanche's own code (optional: needs avalanche-lib).

Avalanche 0.6.0 installs beside the pinned torch but its strategies do not run with it (docs/benchmark.md),
so the harness implements EWC/LwF/replay itself; where avalanche-lib is installed
(`pip install avalanche-lib==0.6.0`), this test checks the definitions against it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deltapatch.data.dataset import Split, TaskData
from deltapatch.stream.strategies.base import MultiHeadModel, StreamContext
from deltapatch.stream.strategies.ewc import importances
from deltapatch.train import Normalizer

avalanche_plugins = pytest.importorskip("avalanche.training.plugins", reason="avalanche-lib is an optional cross-check")


class _OneTask(nn.Module):
    def __init__(self, model: MultiHeadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x, "t")


def test_ewc_importances_match_avalanche() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = MultiHeadModel(backbone, nn.Linear(4, 3))
    model.add_head("t", 5)
    images = torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 5, (37,))
    split = Split(images, labels)
    norm = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    ours = importances(model, TaskData("t", list("abcde"), split, split, split), "t",
                       StreamContext({}, None, norm, torch.device("cpu"), 16, 0))  # type: ignore[arg-type]
    wrapped = _OneTask(model)
    dataset = TensorDataset(norm(images), labels, torch.zeros(37, dtype=torch.long))
    theirs = avalanche_plugins.EWCPlugin(ewc_lambda=1.0).compute_importances(
        wrapped, nn.CrossEntropyLoss(), torch.optim.SGD(wrapped.parameters(), lr=0.1), dataset, "cpu", 16)
    for name, value in ours.items():
        assert torch.allclose(value, theirs[f"model.backbone.{name}"].data, atol=1e-9), name
    assert max(float(v.abs().max()) for v in ours.values()) > 0


def test_lwf_distillation_matches_avalanche() -> None:
    import copy

    from avalanche.training.regularization import LearningWithoutForgetting

    from deltapatch.delta.routing import BASE
    from deltapatch.stream.strategies.lwf import Lwf, LwfSettings

    torch.manual_seed(0)
    student = MultiHeadModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), nn.Linear(6, 3))
    student.add_head("a", 4)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.3 * torch.randn_like(param))
    lwf = Lwf(StreamContext({}, None, None, torch.device("cpu"), 8, 0), LwfSettings(alpha=0.7, temperature=2.0))  # type: ignore[arg-type]
    lwf.model, lwf.teacher, lwf.old_tasks = student, teacher, [BASE, "a"]
    x = torch.randn(8, 3, 2, 2)
    ours = lwf.distillation(x, student.backbone(x))
    reference = LearningWithoutForgetting(alpha=0.7, temperature=2.0)
    theirs = 0.7 * sum(reference._distillation_loss(student.logits(x, t), teacher.logits(x, t), set(range(k)))
                       for t, k in ((BASE, 3), ("a", 4)))
    assert torch.allclose(ours, theirs) and float(ours) > 0
