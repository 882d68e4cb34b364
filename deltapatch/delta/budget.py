"""A parameter budget for a patch, and the per-layer ranks that fit it.

A patch stores Δs on every wrapped conv/linear, its own norm layers (affine parameters and, for
BatchNorm, running statistics) and its own head. `delta.budget_pct` caps everything it stores as a
percentage of the base model's parameters, whatever the architecture — so both its trainable
parameters and its file stay within that share of the base (every stored tensor is also charged
`TENSOR_OVERHEAD` values for its safetensors header entry and its line in patch.json). The norm
layers and the head are a fixed cost; what is left is shared among the Δ layers by
`allocate_ranks`, a pure function of the layers' shapes.

params.yaml ships `delta.budget_pct: 3`; null lifts the cap (and an explicit `delta.lowrank.rank`
puts one rank on every layer instead of allocating).

    layout = net.patch_layout(num_classes=10)            # shapes + fixed costs of one patch
    ranks = allocate_ranks(layout.layers, layout.delta_budget(3.0), "uniform")

`uniform` gives every layer the same rank, the largest that fits. A fixed rank costs
far more, relatively, on thin layers (a rank-8 Δ on a 16→16 1×1 conv has as many parameters as the
layer itself), so the budget, not the rank, is what carries across architectures; `proportional`
gives every layer the same *fraction* of its own size instead (more rank to the wide late layers),
and `weights` (e.g. importance scores measured on the task) tilt either one layer by layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from deltapatch.errors import DeltapatchError

ALLOCATIONS = ("proportional", "uniform")
# Values (float32: 4 bytes each) charged per stored tensor for the file format. Measured on a
# resnet18 patch: 79 bytes of safetensors header per tensor; a rank line in patch.json adds ~30.
TENSOR_OVERHEAD = 32


class BudgetError(DeltapatchError, ValueError):
    """A patch cannot fit `delta.budget_pct` of this base model."""


@dataclass(frozen=True)
class LayerShape:
    """A Δ-wrapped layer seen as its weight matrix: out_features × fan_in (C_in/groups·k·k)."""

    name: str
    out_features: int
    fan_in: int

    @property
    def size(self) -> int:
        return self.out_features * self.fan_in

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.fan_in)

    def lowrank_params(self, rank: int) -> int:
        """Parameters of a rank-`rank` Δ = B (out × r) · A (r × fan_in), rank capped at full rank."""
        return min(rank, self.max_rank) * (self.out_features + self.fan_in)


def rank_one_cost(layers: Sequence[LayerShape]) -> int:
    """Parameters of a rank-1 Δ on every layer: below this a budget leaves layers without a Δ."""
    return sum(layer.lowrank_params(1) for layer in layers)


@dataclass(frozen=True)
class PatchLayout:
    """What one patch on a given base costs, in parameters, before its Δs are sized."""

    layers: tuple[LayerShape, ...]  # the Δ-wrapped conv/linear layers, in module order
    norm_state: int                 # values of the task's own norm layers: affine + running statistics
    head_params: int                # the task's classifier (weight + bias)
    base_params: int                # every parameter of the base model
    fixed_tensors: int = 0          # tensors of the norm layers and head (each costs TENSOR_OVERHEAD)

    @property
    def fixed_params(self) -> int:
        """Values charged whatever the ranks: norm layers, head, and the file overhead of every
        tensor (two per Δ layer, charged even if the layer ends up with rank 0)."""
        tensors = self.fixed_tensors + 2 * len(self.layers)
        return self.norm_state + self.head_params + TENSOR_OVERHEAD * tensors

    def full_coverage_pct(self) -> float:
        """The smallest budget (% of the base) that pays for a rank-1 Δ on every layer: below it a
        thin network (norm layers and head a large share of its parameters) leaves layers without one."""
        return 100.0 * (self.fixed_params + rank_one_cost(self.layers)) / self.base_params

    def covers_every_layer(self, budget_pct: float) -> bool:
        """Whether `budget_pct` pays for a Δ of rank ≥ 1 on every layer (allocate_ranks' own test)."""
        return rank_one_cost(self.layers) <= self.delta_budget(budget_pct)

    def budget_params(self, budget_pct: float) -> int:
        return math.floor(budget_pct / 100.0 * self.base_params)

    def delta_budget(self, budget_pct: float) -> int:
        """Values left for the Δs once the norm layers and the head are paid for."""
        left = self.budget_params(budget_pct) - self.fixed_params
        if left < 0:
            raise BudgetError(
                f"delta.budget_pct {budget_pct:g} allows {self.budget_params(budget_pct)} values, but the head and "
                f"the norm layers (parameters and statistics) alone take {self.fixed_params} "
                f"({100.0 * self.fixed_params / self.base_params:.2f} % of the base); raise delta.budget_pct"
            )
        return left


def allocate_ranks(layers: Sequence[LayerShape], budget: int, allocation: str = "uniform",
                   weights: Mapping[str, float] | None = None) -> dict[str, int]:
    """Ranks (≤ full rank) for `layers` whose Δs total at most `budget` parameters.

    `proportional`: layer l's ideal rank is ρ·size_l/(out_l + fan_in_l), i.e. its Δ costs the same
    fraction ρ of its own size everywhere; `uniform`: ρ everywhere. `weights` (mean ~1, > 0)
    multiply each layer's ideal rank. ρ is the largest value whose rounded-down ranks fit; the
    parameters left over then go, one rank at a time, to the layers furthest below their ideal
    (rounded up). What stays unspent is less than one more rank on every layer.

    Every layer gets rank ≥ 1 when the budget pays for that; otherwise (thin networks, tight
    budgets) layers whose ideal rank rounds down to 0 may get no Δ at all (rank 0).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown rank allocation '{allocation}'; available: {list(ALLOCATIONS)}")
    if not layers:
        return {}
    shares = {}
    for layer in layers:
        share = layer.size / (layer.out_features + layer.fan_in) if allocation == "proportional" else 1.0
        weight = 1.0 if weights is None else float(weights[layer.name])
        if not weight > 0:
            raise ValueError(f"rank weight of layer '{layer.name}' must be > 0, got {weight}")
        shares[layer.name] = share * weight

    if budget < 0:
        raise BudgetError(f"a Δ budget of {budget} parameters is negative")
    min_rank = 1 if rank_one_cost(layers) <= budget else 0

    def ranks_at(rho: float) -> dict[str, int]:
        return {s.name: max(min_rank, min(s.max_rank, math.floor(rho * shares[s.name]))) for s in layers}

    def cost(ranks: Mapping[str, int]) -> int:
        return sum(s.lowrank_params(ranks[s.name]) for s in layers)

    low, high = 0.0, max(s.max_rank / shares[s.name] for s in layers) + 1.0
    for _ in range(60):  # bisection on ρ: cost(ranks_at(ρ)) is non-decreasing in ρ
        middle = (low + high) / 2
        low, high = (middle, high) if cost(ranks_at(middle)) <= budget else (low, middle)
    ranks = ranks_at(low)
    left = budget - cost(ranks)
    # Spend the remainder (less than one more rank on every layer) one rank at a time, on the layer
    # furthest below its ideal rank, relatively, among those it still pays for, never past the ideal
    # rounded up (a cheap layer must not soak up what a larger one could not use).
    def room(s: LayerShape) -> bool:
        return ranks[s.name] < min(s.max_rank, math.ceil(low * shares[s.name]))

    while True:
        fits = [s for s in layers if room(s) and s.out_features + s.fan_in <= left]
        if not fits:
            return ranks
        layer = min(fits, key=lambda s: (ranks[s.name] / (low * shares[s.name] + 1e-12), s.name))
        ranks[layer.name] += 1
        left -= layer.out_features + layer.fan_in
