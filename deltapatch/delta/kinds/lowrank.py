"""`lowrank` Δ: ΔW = reshape(B · A) with rank r, B zero-initialised (LoRA's form, for convolutions).

For an ungrouped Conv2d the Δ is computed in activation space, B(A(x)), with A a k×k convolution
to r channels and B a 1×1 convolution back to C_out: the same function as conv(x, W + ΔW) without
the full-size weight gradient. Grouped convolutions (depthwise) and Linear layers use the
weight-space form, which is cheap for them.

The rank of each layer comes from the patch's parameter budget (`delta.budget_pct`, shared out by
`deltapatch.delta.budget.allocate_ranks`), unless `rank` fixes one rank for every layer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltapatch.delta.budget import ALLOCATIONS, PatchLayout, allocate_ranks
from deltapatch.delta.kinds.base import DeltaConfig, DeltaLayer, FrozenLayer
from deltapatch.delta.kinds.registry import register_delta_kind
from deltapatch.errors import DeltapatchError


@dataclass
class LowRankConfig(DeltaConfig):
    """`rank`: one rank for every layer (an explicit override of the budget); None: per-layer ranks
    allocated under `budget_pct` by `allocation`. `ranks` holds the per-layer ranks once resolved
    for a network (that is what patch.json records, and what loading a patch reuses); rank 0 = no Δ
    on that layer (a budget too tight for every layer)."""

    kind = "lowrank"
    rank: int | None = None
    allocation: str = "uniform"  # measured against proportional: docs/benchmark.md
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"delta.lowrank.rank must be >= 1 (or left out to use delta.budget_pct), got {self.rank}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"delta.lowrank.allocation must be one of {list(ALLOCATIONS)}, got '{self.allocation}'")
        if self.rank is None and self.budget_pct is None and not self.ranks:
            raise ValueError("delta.lowrank needs a rank or delta.budget_pct")
        bad = {name: r for name, r in self.ranks.items() if not isinstance(r, int) or r < 0}
        if bad:
            raise ValueError(f"delta_config.ranks must be integers >= 0; got {dict(list(bad.items())[:3])}")

    @property
    def enforces_budget(self) -> bool:
        return self.rank is None and self.budget_pct is not None

    def resolve(self, layout: PatchLayout) -> LowRankConfig:
        names = [layer.name for layer in layout.layers]
        if self.ranks:
            missing, extra = sorted(set(names) - set(self.ranks)), sorted(set(self.ranks) - set(names))
            if missing or extra:
                raise DeltapatchError(
                    f"delta_config.ranks does not fit this base model: no rank for {missing[:3]}, "
                    f"unknown layers {extra[:3]}; the patch was made for another architecture"
                )
            return dataclasses.replace(self, ranks={name: self.ranks[name] for name in names})
        if self.rank is not None:
            ranks = {layer.name: min(self.rank, layer.max_rank) for layer in layout.layers}
        else:
            ranks = allocate_ranks(layout.layers, layout.delta_budget(self.budget_pct), self.allocation)  # type: ignore[arg-type]
        return dataclasses.replace(self, ranks=ranks)

    def layer_config(self, name: str) -> LowRankConfig:
        if name in self.ranks:
            return dataclasses.replace(self, rank=self.ranks[name], ranks={})
        if self.rank is None:
            raise DeltapatchError(f"no rank for layer '{name}': resolve the config on the network first")
        return self


@register_delta_kind
class LowRankDelta(DeltaLayer):
    config_class = LowRankConfig

    def __init__(self, frozen: FrozenLayer, config: LowRankConfig) -> None:
        super().__init__(frozen, config)
        weight = frozen.weight
        out_features, fan_in = weight.shape[0], weight[0].numel()
        if config.rank is None:
            raise DeltapatchError("a lowrank Δ layer needs a resolved rank (LowRankConfig.layer_config)")
        rank = self.rank = min(config.rank, out_features, fan_in)
        if rank == 0:  # the budget left this layer without a Δ: the task uses the frozen layer as is
            return
        self.activation_space = isinstance(frozen, nn.Conv2d) and frozen.groups == 1
        # A: (r, fan_in) with LoRA's Kaiming init; B: (C_out, r) zeros, so ΔW = 0 at start.
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self, frozen: FrozenLayer) -> torch.Tensor:
        """ΔW with the frozen weight's shape, e.g. (C_out, C_in/groups, k, k)."""
        if self.rank == 0:
            return torch.zeros_like(frozen.weight)
        return (self.lora_B @ self.lora_A).view_as(frozen.weight)

    def forward(self, x: torch.Tensor, frozen_out: torch.Tensor, frozen: FrozenLayer) -> torch.Tensor:
        if self.rank == 0:
            return frozen_out
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
