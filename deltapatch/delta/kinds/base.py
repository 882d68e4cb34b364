"""The interface every Δ kind implements: a config dataclass and a layer.

A Δ layer is the trainable part of ONE task on ONE frozen layer (Conv2d or Linear). It works in
activation space — it receives the frozen layer's input and output and returns the patched output —
because adding Δ to the weights before the convolution makes autograd compute a full-size weight
gradient and saves no training time (see README, "Training cost"). `merged_weight` folds the same
function into plain weights for serving one task with zero overhead.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from torch import nn

from deltapatch.delta.budget import PatchLayout
from deltapatch.delta.routing import PatchedRows

FrozenLayer = nn.Conv2d | nn.Linear


def conv_like(frozen: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`frozen`'s convolution of `x` with another `weight` (same groups, no bias): its stride,
    padding and dilation, and a subclass's own padding rule too (timm's Conv2dSame pads TF-'same',
    asymmetrically, inside its forward; its `padding` attribute is 0)."""
    if type(frozen) is nn.Conv2d and frozen.padding_mode == "zeros":
        return F.conv2d(x, weight, None, frozen.stride, frozen.padding, frozen.dilation, frozen.groups)
    swapped = {"weight": weight} | ({} if frozen.bias is None else {"bias": torch.zeros_like(frozen.bias)})
    return torch.func.functional_call(frozen, swapped, (x,))


def can_conv_groups(frozen: nn.Conv2d) -> bool:
    """Whether `conv_groups` follows `frozen`'s padding rule: zero padding (nn.Conv2d) or timm's
    TF-'same' (Conv2dSame). Another rule (reflect, a custom subclass) keeps the per-task loop."""
    return (type(frozen) is nn.Conv2d and frozen.padding_mode == "zeros") or type(frozen) is Conv2dSame


def conv_groups(frozen: nn.Conv2d, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """G groups of n samples each convolved with their group's own kernel, in ONE convolution (the
    groups side by side as channel groups, the way per-sample kernels are batched), under `frozen`'s
    stride, padding, dilation and groups. Only for a layer `can_conv_groups` accepts.

    x: (n, G, C_in, H, W); weights: (G, C', C_in/groups, k, k) → (n, G, C', H', W').
    """
    samples, groups = x.shape[:2]
    flat_x = x.reshape(samples, groups * x.shape[2], *x.shape[3:])
    flat_w = weights.reshape(groups * weights.shape[1], *weights.shape[2:])
    if type(frozen) is Conv2dSame:
        stride, dilation = cast(tuple[int, int], frozen.stride), cast(tuple[int, int], frozen.dilation)
        out = conv2d_same(flat_x, flat_w, None, stride, (0, 0), dilation, frozen.groups * groups)
    else:
        out = F.conv2d(flat_x, flat_w, None, frozen.stride, frozen.padding, frozen.dilation, frozen.groups * groups)
    return out.view(samples, groups, -1, *out.shape[2:])


def row_view(rows: torch.Tensor, like: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Shape per-sample channel vectors (P, C) to broadcast over `like` (P, C, ...), or over
    (P, ..., C) with `channels_last` (a Linear layer's features are its last dimension)."""
    if channels_last:
        return rows.view(rows.shape[0], *([1] * (like.dim() - 2)), rows.shape[1])
    return rows.view(*rows.shape, *([1] * (like.dim() - 2)))


@dataclass
class DeltaConfig:
    """Hyper-parameters of a Δ kind. Subclasses set `kind` and add their fields.

    `budget_pct` (params.yaml `delta.budget_pct`, 3 there) caps everything a patch stores (Δs, norm
    layers, head, file overhead) as a percentage of the base model's parameters, and sizes kinds
    that can be sized (lowrank: per-layer ranks); None (the default): no budget, no cap.
    """

    kind: ClassVar[str] = ""
    budget_pct: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """What patch.json records; without `budget_pct` while it is None (as before the budget)."""
        values = dataclasses.asdict(self)
        if values["budget_pct"] is None:
            del values["budget_pct"]
        return values

    def resolve(self, layout: PatchLayout) -> DeltaConfig:
        """This config completed for one network (e.g. per-layer ranks under the budget); what a
        patch records in patch.json. Default: nothing depends on the network."""
        return self

    def layer_config(self, name: str) -> DeltaConfig:
        """The config of the Δ on wrapped layer `name` (default: the same for every layer)."""
        return self

    def layers_without_delta(self) -> int:
        """How many wrapped layers this resolved config leaves without a Δ (a budget too tight)."""
        return 0


class StackedDelta(ABC):
    """Every task's Δ of one kind on one frozen layer, held in stacked tensors, so that a mixed-task
    batch costs a fixed number of kernels on that layer whatever the number of tasks (each sample
    gathers its own task's rows of the stacks; Punica/S-LoRA serve many LoRA adapters this way).
    A snapshot: the wrapper rebuilds it when a patch changes (`Router.version`)."""

    @abstractmethod
    def patch(self, out: torch.Tensor, x: torch.Tensor, patched: PatchedRows) -> None:
        """Turn the samples `patched.rows` of `out` (= frozen(x) for the whole batch) into their
        tasks' patched outputs, in place; every other row of `out` is left exactly as it is.

        Args:
            out: frozen(x), (N, C_out, H', W') or (N, ..., F_out).
            x: the frozen layer's input, (N, C_in, H, W) or (N, ..., F_in).
            patched: the samples to patch and each one's task as an index into the `layers` the
                stack was built from.
        """


class DeltaLayer(nn.Module, ABC):
    """Trainable Δ for one frozen layer; zero-initialised so a fresh patch equals the base.

    A kind subclasses this with its own `config_class` (the DeltaConfig subclass it is built from).
    """

    config_class: ClassVar[type[DeltaConfig]]

    def __init__(self, frozen: FrozenLayer, config: DeltaConfig) -> None:
        super().__init__()
        self.config = config

    @abstractmethod
    def forward(self, x: torch.Tensor, frozen_out: torch.Tensor, frozen: FrozenLayer) -> torch.Tensor:
        """Patched output.

        Args:
            x: input of the frozen layer, (N, C_in, H, W) or (N, F_in).
            frozen_out: frozen(x), (N, C_out, H', W') or (N, F_out).
            frozen: the frozen layer itself (read-only).
        """

    @abstractmethod
    def merged_weight(self, frozen: FrozenLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of a plain layer computing the same function as forward() (run under
        torch.no_grad())."""

    @classmethod
    def stack(cls, layers: Sequence[DeltaLayer], frozen: FrozenLayer) -> StackedDelta | None:
        """The Δs of several tasks on `frozen` (all of this kind) as one StackedDelta, for mixed
        batches. None (the default): the kind has no stacked form on this layer, and a mixed batch
        runs each task's forward() on its own samples instead."""
        return None


def channel_view(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a per-channel (C,) vector to broadcast over `like` (N, C, ...)."""
    return vector.view(1, -1, *([1] * (like.dim() - 2)))


def weight_view(vector: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Shape a per-output-channel (C_out,) vector to broadcast over a weight (C_out, ...)."""
    return vector.view(-1, *([1] * (weight.dim() - 1)))
