"""`lowrank` Δ: ΔW = reshape(B · A) with rank r, B zero-initialised (LoRA's form, for convolutions).

For an ungrouped Conv2d the Δ is computed in activation space, B(A(x)), with A a k×k convolution
to r channels and B a 1×1 convolution back to C_out: the same function as conv(x, W + ΔW) without
the full-size weight gradient. Grouped convolutions (depthwise) and Linear layers use the
weight-space form, which is cheap for them.

With a parameter budget (`delta.budget_pct`, 3 in the shipped params.yaml) each layer's rank comes
from `deltapatch.delta.budget.allocate_ranks`; an explicit `rank` puts that rank on every layer
instead (the budget then only caps the patch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltapatch.delta.budget import ALLOCATIONS, PatchLayout, allocate_ranks
from deltapatch.delta.kinds.base import (
    DeltaConfig,
    DeltaLayer,
    FrozenLayer,
    StackedDelta,
    can_conv_groups,
    conv_groups,
    conv_like,
)
from deltapatch.delta.kinds.registry import register_delta_kind
from deltapatch.delta.routing import PatchedRows
from deltapatch.errors import DeltapatchError

DEFAULT_RANK = 4  # a LowRankConfig() with neither a rank nor a budget (the Python API; params.yaml sets a budget)


# Ranks weighted by each layer's AdaLoRA-style importance on the task (deltapatch/delta/importance.py).
IMPORTANCE = "importance"
# `proportional` where the budget pays for a Δ on every layer, `importance` where it does not: there
# the other allocations leave most layers of a thin network without a Δ and the patch is little more
# than a BatchNorm patch. Measured (docs/benchmark.md, "Other architectures"): MobileNetV3-small at
# 3 % −0.42 vs full-ft with uniform, −0.01 with importance; ConvNeXt-tiny at 3 % −0.056 uniform,
# −0.022 proportional; ResNet-18 a tie (five built-in tasks × two seeds: 0.991 proportional, 0.992 uniform).
AUTO = "auto"
ALLOCATION_CHOICES = (*ALLOCATIONS, IMPORTANCE, AUTO)

@dataclass
class LowRankConfig(DeltaConfig):
    """How the layers' ranks are chosen, most explicit first:

    - `ranks`: per-layer ranks already allocated for a network (what patch.json records and what
      loading a patch reuses); rank 0 = no Δ on that layer (a budget too tight for every layer);
    - `rank`: one rank on every layer, capped at each layer's full rank (an explicit override: a
      set `budget_pct` then only caps what the patch may store);
    - `budget_pct` alone: per-layer ranks allocated under it by `allocation`;
    - none of them: `DEFAULT_RANK` on every layer."""

    kind = "lowrank"
    rank: int | None = None
    allocation: str = "uniform"  # with budget_pct: one of ALLOCATION_CHOICES; measured: docs/benchmark.md
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"delta.lowrank.rank must be >= 1 (0: no Δ at all), got {self.rank}")
        if self.allocation not in ALLOCATION_CHOICES:
            raise ValueError(f"delta.lowrank.allocation must be one of {list(ALLOCATION_CHOICES)}, "
                             f"got '{self.allocation}'")
        bad = {name: r for name, r in self.ranks.items() if not isinstance(r, int) or r < 0}
        if bad:
            raise ValueError(f"delta_config.ranks must be integers >= 0; got {dict(list(bad.items())[:3])}")

    def to_dict(self) -> dict[str, Any]:
        """Without the budget's fields while the budget is off ({"rank": r}, as before the budget),
        and without `rank` when the budget allocated `ranks`."""
        values = super().to_dict()
        if self.budget_pct is None and not self.ranks:
            del values["allocation"], values["ranks"]
        if values["rank"] is None:  # the ranks were allocated under the budget
            del values["rank"]
        return values

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
            return self  # `rank` on every layer (LowRankDelta caps it at the layer's full rank)
        if self.budget_pct is None:
            return dataclasses.replace(self, rank=DEFAULT_RANK)
        settled = self.settle_allocation(layout)
        if settled.allocation == IMPORTANCE:
            raise DeltapatchError(
                f"delta.lowrank.allocation '{self.allocation}' needs importance ranks on this base, measured on the "
                "task's data by a pilot training: resolve the config with "
                "deltapatch.delta.importance.with_importance_ranks first (deltapatch.patching.train_patch and the bench do)"
            )
        ranks = allocate_ranks(layout.layers, layout.delta_budget(self.budget_pct), settled.allocation)
        return dataclasses.replace(settled, ranks=ranks)

    def settle_allocation(self, layout: PatchLayout) -> LowRankConfig:
        """`auto` decided for this base: `proportional` when the budget gives every layer a Δ, else
        `importance`. Any other allocation, or ranks already set, unchanged."""
        if self.allocation != AUTO or self.ranks or self.rank is not None or self.budget_pct is None:
            return self
        covered = layout.covers_every_layer(self.budget_pct)
        return dataclasses.replace(self, allocation="proportional" if covered else IMPORTANCE)

    def layers_without_delta(self) -> int:
        return sum(1 for r in self.ranks.values() if r == 0) if self.ranks else int(self.rank == 0)

    def layer_config(self, name: str) -> LowRankConfig:
        if not self.ranks:
            return self
        if name not in self.ranks:
            raise DeltapatchError(f"no rank for layer '{name}': resolve the config on the network first")
        return dataclasses.replace(self, rank=self.ranks[name], ranks={})


@register_delta_kind
class LowRankDelta(DeltaLayer):
    config_class = LowRankConfig

    def __init__(self, frozen: FrozenLayer, config: LowRankConfig) -> None:
        super().__init__(frozen, config)
        weight = frozen.weight
        out_features, fan_in = weight.shape[0], weight[0].numel()
        rank = self.rank = min(DEFAULT_RANK if config.rank is None else config.rank, out_features, fan_in)
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
            hidden = conv_like(frozen, x, kernel_a)  # groups == 1 here
            return frozen_out + F.conv2d(hidden, self.lora_B[:, :, None, None])
        return frozen_out + conv_like(frozen, x, self.delta_weight(frozen))

    @torch.no_grad()
    def merged_weight(self, frozen: FrozenLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if frozen.bias is None else frozen.bias.clone()
        return frozen.weight + self.delta_weight(frozen), bias

    @classmethod
    def stack(cls, layers: Sequence[DeltaLayer], frozen: FrozenLayer) -> StackedDelta | None:
        if isinstance(frozen, nn.Conv2d) and not can_conv_groups(frozen):
            return None
        return StackedLowRank([layer for layer in layers if isinstance(layer, LowRankDelta)], frozen)


class StackedLowRank(StackedDelta):
    """The tasks' A (T, r', fan_in) and B (T, C_out, r') on one layer, each task's rank padded with
    zeros to r' (a zero row of A and column of B add nothing). Per mixed batch, on P patched samples:

    - Conv2d: the convolution (A; depthwise layers: ΔW = B·A, one batched matmul first) as ONE
      grouped convolution over the batch's tasks side by side (`conv_groups` on the samples'
      `Segments`), so each task's kernel is read once per batch; where that grid would mostly
      repeat samples (one task holds most of the batch), one group per sample instead;
    - then, ungrouped, each sample's B by one batched matmul;
    - Linear: A then B, each one batched matmul.

    r' is the largest rank rounded up to `SIMD_RANK` or a power of two above it: oneDNN's grouped
    convolution runs ~2× faster with 4, 8 or 16 output channels per group than with 1–3 or 12
    (measured, docs/serving.md). Each task's `lora_A` parameter is re-pointed at its rows of the
    stack (same values, shared storage): memory per served patch stays below 2× its file.
    """

    SIMD_RANK = 4

    def __init__(self, layers: Sequence[LowRankDelta], frozen: FrozenLayer) -> None:
        weight = frozen.weight
        out_features, fan_in = weight.shape[0], weight[0].numel()
        largest = max(layer.rank for layer in layers)
        self.frozen, self.rank = frozen, 0 if largest == 0 else max(self.SIMD_RANK, 1 << (largest - 1).bit_length())
        self.lora_A = weight.new_zeros((len(layers), self.rank, fan_in))
        self.lora_B = weight.new_zeros((len(layers), out_features, self.rank))
        for i, layer in enumerate(layers):
            if layer.rank:
                self.lora_A[i, : layer.rank] = layer.lora_A
                self.lora_B[i, :, : layer.rank] = layer.lora_B
                # A is most of a patch's bytes: the task's own A becomes a view of its (contiguous)
                # rows of the stack, so serving T patches holds their A once, not twice.
                layer.lora_A.data = self.lora_A[i, : layer.rank]

    def patch(self, out: torch.Tensor, x: torch.Tensor, patched: PatchedRows) -> None:
        if self.rank:
            out.index_add_(0, patched.rows, self.delta(x, patched).to(out.dtype))

    def delta(self, x: torch.Tensor, patched: PatchedRows) -> torch.Tensor:
        """Δ(x) of the patched samples (x: the whole batch's input of the frozen layer), (P, ...)."""
        frozen, rows, slots = self.frozen, patched.rows, patched.slots
        if isinstance(frozen, nn.Linear):  # (P, ..., F_in) → (P, L, F_in): the batched matmuls' layout
            inputs = x[rows]
            hidden = torch.bmm(inputs.reshape(len(rows), -1, x.shape[-1]), self.lora_A[slots].transpose(1, 2))
            return torch.bmm(hidden, self.lora_B[slots].transpose(1, 2)).view(*inputs.shape[:-1], -1)
        if frozen.groups == 1:  # activation space, as LowRankDelta.forward: A as a convolution, then B
            hidden = self._conv(x, patched, lambda tasks: self.lora_A[tasks].view(len(tasks), self.rank,
                                                                                  *frozen.weight.shape[1:]))
            return torch.bmm(self.lora_B[slots], hidden.flatten(2)).view(len(rows), -1, *hidden.shape[2:])
        return self._conv(x, patched, lambda tasks: torch.bmm(self.lora_B[tasks], self.lora_A[tasks])
                          .view(len(tasks), *frozen.weight.shape))

    def _conv(self, x: torch.Tensor, patched: PatchedRows,
              kernels: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The patched samples each convolved with `kernels(tasks)[i]` of its task, (P, C', H', W'):
        over Segments (each task's kernel built and read once), else one group per sample."""
        assert isinstance(self.frozen, nn.Conv2d)
        segments = patched.segments
        if segments is None:
            return conv_groups(self.frozen, x[patched.rows].unsqueeze(0), kernels(patched.slots)).squeeze(0)
        grid = x[segments.source].view(segments.depth, len(segments.present), *x.shape[1:])
        out = conv_groups(self.frozen, grid, kernels(segments.present))
        return out.flatten(0, 1)[segments.cell]
