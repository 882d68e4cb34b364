"""`channel` Δ: a per-output-channel scale and shift of the frozen kernel.

    W' = W · (1 + s),   b' = b · (1 + s) + t,   s, t ∈ R^{C_out}, both zero-initialised.

Trained as `frozen(x) · (1 + s) + t`, whose gradient is a cheap per-channel reduction: the
cheapest Δ to train (no extra convolution at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltapatch.delta.kinds.base import (
    DeltaConfig,
    DeltaLayer,
    FrozenLayer,
    StackedDelta,
    channel_view,
    row_view,
    weight_view,
)
from deltapatch.delta.kinds.registry import register_delta_kind
from deltapatch.delta.routing import PatchedRows


@dataclass
class ChannelConfig(DeltaConfig):
    kind = "channel"


@register_delta_kind
class ChannelDelta(DeltaLayer):
    config_class = ChannelConfig

    def __init__(self, frozen: FrozenLayer, config: ChannelConfig) -> None:
        super().__init__(frozen, config)
        out_channels = frozen.weight.shape[0]
        self.scale = nn.Parameter(torch.zeros(out_channels))
        self.shift = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, frozen_out: torch.Tensor, frozen: FrozenLayer) -> torch.Tensor:
        if isinstance(frozen, nn.Linear):  # features are the last dim, e.g. ConvNeXt's (N, H, W, C) MLPs
            return torch.addcmul(self.shift, frozen_out, 1 + self.scale)
        return torch.addcmul(
            channel_view(self.shift, frozen_out), frozen_out, channel_view(1 + self.scale, frozen_out)
        )

    @torch.no_grad()
    def merged_weight(self, frozen: FrozenLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        factor = 1 + self.scale
        weight = frozen.weight * weight_view(factor, frozen.weight)
        bias = self.shift.clone() if frozen.bias is None else frozen.bias * factor + self.shift
        return weight, bias

    @classmethod
    def stack(cls, layers: Sequence[DeltaLayer], frozen: FrozenLayer) -> StackedDelta | None:
        return StackedChannel([layer for layer in layers if isinstance(layer, ChannelDelta)], frozen)


class StackedChannel(StackedDelta):
    """The tasks' scales and shifts (T, C_out): one gathered multiply-add per mixed batch."""

    def __init__(self, layers: Sequence[ChannelDelta], frozen: FrozenLayer) -> None:
        self.channels_last = isinstance(frozen, nn.Linear)
        self.factor = torch.stack([1 + layer.scale for layer in layers])
        self.shift = torch.stack([layer.shift for layer in layers])

    def patch(self, out: torch.Tensor, x: torch.Tensor, patched: PatchedRows) -> None:
        frozen_out, slots = out[patched.rows], patched.slots
        shift = row_view(self.shift[slots], frozen_out, self.channels_last)
        result = torch.addcmul(shift, frozen_out, row_view(self.factor[slots], frozen_out, self.channels_last))
        out.index_copy_(0, patched.rows, result.to(out.dtype))
