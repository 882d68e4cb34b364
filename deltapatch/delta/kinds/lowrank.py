"""`lowrank` Δ: ΔW = reshape(B · A) with rank r, B zero-initialised (LoRA's form, for convolutions).

For an ungrouped Conv2d the Δ is computed in activation space, B(A(x)), with A a k×k convolution
to r channels and B a 1×1 convolution back to C_out: the same function as conv(x, W + ΔW) without
the full-size weight gradient. Grouped convolutions (depthwise) and Linear layers use the
weight-space form, which is cheap for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltapatch.delta.kinds.base import DeltaConfig, DeltaLayer, FrozenLayer
from deltapatch.delta.kinds.registry import register_delta_kind


@dataclass
class LowRankConfig(DeltaConfig):
    kind = "lowrank"
    rank: int = 4

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"delta.lowrank.rank must be >= 1, got {self.rank}")


@register_delta_kind
class LowRankDelta(DeltaLayer):
    config_class = LowRankConfig

    def __init__(self, frozen: FrozenLayer, config: LowRankConfig) -> None:
        super().__init__(frozen, config)
        weight = frozen.weight
        out_features, fan_in = weight.shape[0], weight[0].numel()
        rank = min(config.rank, out_features, fan_in)
        self.activation_space = isinstance(frozen, nn.Conv2d) and frozen.groups == 1
        # A: (r, fan_in) with LoRA's Kaiming init; B: (C_out, r) zeros, so ΔW = 0 at start.
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self, frozen: FrozenLayer) -> torch.Tensor:
        """ΔW with the frozen weight's shape, e.g. (C_out, C_in/groups, k, k)."""
        return (self.lora_B @ self.lora_A).view_as(frozen.weight)

    def forward(self, x: torch.Tensor, frozen_out: torch.Tensor, frozen: FrozenLayer) -> torch.Tensor:
        if isinstance(frozen, nn.Linear):
            return frozen_out + F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.activation_space:
            kernel_a = self.lora_A.view(-1, *frozen.weight.shape[1:])  # (r, C_in, k, k)
            hidden = F.conv2d(x, kernel_a, None, frozen.stride, frozen.padding, frozen.dilation)
            return frozen_out + F.conv2d(hidden, self.lora_B[:, :, None, None])
        delta = self.delta_weight(frozen)
        return frozen_out + F.conv2d(x, delta, None, frozen.stride, frozen.padding, frozen.dilation, frozen.groups)

    @torch.no_grad()
    def merged_weight(self, frozen: FrozenLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if frozen.bias is None else frozen.bias.clone()
        return frozen.weight + self.delta_weight(frozen), bias
