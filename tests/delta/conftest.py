"""A small random base CNN and a wrapped copy, for fast Δ-Network unit tests."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltapatch.models.base import BaseSettings, build_architecture


def random_base(arch: str = "resnet18", num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_architecture(BaseSettings(arch=arch, small_input_stem=arch.startswith("resnet")), num_classes)
    # Non-trivial BN statistics, so a BN mix-up between tasks would show in the logits.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture
def base_and_reference() -> tuple[nn.Module, nn.Module]:
    """(model to wrap, untouched deep copy to compare against)."""
    model = random_base()
    return model, copy.deepcopy(model)


@pytest.fixture
def images() -> torch.Tensor:
    """(12, 3, 32, 32) normalised inputs."""
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(parameters: list[nn.Parameter], scale: float = 0.05, seed: int = 2) -> None:
    """Move a patch away from its zero init, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            param.add_(torch.randn(param.shape, generator=generator) * scale)
