"""Importance-weighted rank allocation, after AdaLoRA (Zhang et al. 2023; PEFT's `RankAllocator`).

AdaLoRA scores every parameter of a low-rank update by its smoothed sensitivity |θ·∇θ| times the
smoothed uncertainty of that sensitivity, and gives rank to the matrices whose update matters most.
Here the same score is measured on a short *pilot* training of the task's patch (budget-sized,
proportional ranks), averaged per layer, and used as the `weights` of `allocate_ranks`; the real
patch is then trained from zero with the re-allocated ranks. The cost is the pilot's epochs.

    weights = layer_importance(net, task, data, settings, norm, budget_pct=3.0)
    config = LowRankConfig(ranks=allocate_ranks(layout.layers, layout.delta_budget(3.0),
                                                "proportional", weights))

`delta.lowrank.allocation: importance` does exactly this through `with_importance_ranks`, which
`deltapatch.patching.train_patch` and the bench call; `auto` (the shipped default) does it only on
a base where the budget cannot give every layer a Δ (thin networks), and is `proportional` elsewhere.
The pilot runs the recipe's full step budget (`train.min_steps`), so a patch costs about twice its
training. Measured: docs/benchmark.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch

from deltapatch.data.dataset import TaskData
from deltapatch.delta.budget import allocate_ranks
from deltapatch.delta.kinds import DeltaConfig
from deltapatch.delta.kinds.lowrank import AUTO, IMPORTANCE, LowRankConfig
from deltapatch.delta.layers import DeltaWrapped
from deltapatch.delta.network import DeltaNetwork
from deltapatch.errors import DeltapatchError
from deltapatch.train import Normalizer, Trainable, TrainSettings, fit

log = logging.getLogger(__name__)

BETA1 = 0.85  # PEFT AdaLoraConfig defaults: EMA of the sensitivity …
BETA2 = 0.85  # … and of its uncertainty


class SensitivityMeter:
    """AdaLoRA's smoothed sensitivity × uncertainty, per parameter, updated after every backward."""

    def __init__(self, parameters: dict[str, list[torch.nn.Parameter]]) -> None:
        self.sensitivity: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}
        self.layers = parameters
        self.handles = [p.register_post_accumulate_grad_hook(self._update) for ps in parameters.values() for p in ps]

    @torch.no_grad()
    def _update(self, param: torch.nn.Parameter) -> None:
        if param.grad is None:
            return
        key = id(param)
        ipt = (param * param.grad).abs()
        avg = self.sensitivity.get(key, torch.zeros_like(ipt))
        avg = BETA1 * avg + (1 - BETA1) * ipt
        unc = self.uncertainty.get(key, torch.zeros_like(ipt))
        self.sensitivity[key] = avg
        self.uncertainty[key] = BETA2 * unc + (1 - BETA2) * (ipt - avg).abs()

    def layer_scores(self) -> dict[str, float]:
        """Mean element score of each layer's Δ (0 for a layer that never got a gradient)."""
        scores = {}
        for name, params in self.layers.items():
            values = [(self.sensitivity[id(p)] * self.uncertainty[id(p)]).flatten() for p in params if id(p) in self.sensitivity]
            scores[name] = float(torch.cat(values).mean()) if values else 0.0
        return scores

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def layer_importance(net: DeltaNetwork, task: str, data: TaskData, settings: TrainSettings, norm: Normalizer, *,
                     budget_pct: float, pilot_epochs: int = 1, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Importance weight (geometric mean 1) of every Δ layer for `task`, from a pilot training.

    The pilot patch is added under `task` and removed again; `net` is left as it was.
    """
    net.add_task(task, data.num_classes, LowRankConfig(budget_pct=budget_pct))
    try:
        deltas = {name: list(w.per_task[task].parameters()) for name, w in net._wrappers() if isinstance(w, DeltaWrapped)}
        meter = SensitivityMeter(deltas)
        net.select(task)
        trainable = Trainable(net, net.task_parameters(task), lambda: net.task_state_dict(task),
                              lambda state: net.load_task_state_dict(task, state))
        try:
            fit(trainable, data, settings, norm, seed=seed, epochs=pilot_epochs, progress=progress,
                desc=f"importance pilot {task}")
        finally:
            meter.close()
        scores = meter.layer_scores()
    finally:
        net.remove_task(task)
    floor = max(max(scores.values()) * 1e-6, 1e-30)  # a silent layer still gets a (tiny) weight
    logs = {name: math.log(max(score, floor)) for name, score in scores.items()}
    centre = sum(logs.values()) / len(logs)
    return {name: math.exp(value - centre) for name, value in logs.items()}


def with_importance_ranks(net: DeltaNetwork, task: str, data: TaskData, config: DeltaConfig, settings: TrainSettings,
                          norm: Normalizer, *, seed: int = 0, progress: bool = False) -> DeltaConfig:
    """`config` with per-layer ranks allocated by importance when it asks for them (`allocation:
    importance`, or `auto` on a base where the budget cannot give every layer a Δ; a budget, no
    explicit rank); `auto` elsewhere becomes `proportional`; any other config unchanged."""
    if not (isinstance(config, LowRankConfig) and config.allocation in (IMPORTANCE, AUTO) and not config.ranks
            and config.rank is None):
        return config
    if config.budget_pct is None:
        if config.allocation == AUTO:
            return config  # no budget: one default rank everywhere, nothing to allocate
        raise DeltapatchError("delta.lowrank.allocation 'importance' shares a budget: set delta.budget_pct (e.g. 3)")
    layout = net.patch_layout(data.num_classes)
    settled = config.settle_allocation(layout)
    if settled.allocation != IMPORTANCE:
        return settled
    if config.allocation == AUTO:
        log.info("delta.lowrank.allocation auto: delta.budget_pct %g cannot give all %d layers of this base a Δ, so a "
                 "pilot training sizes the ranks by importance (about twice the training time)",
                 config.budget_pct, len(layout.layers))
    weights = layer_importance(net, task, data, settings, norm, budget_pct=config.budget_pct, seed=seed,
                               progress=progress)
    ranks = allocate_ranks(layout.layers, layout.delta_budget(config.budget_pct), "proportional", weights)
    return dataclasses.replace(settled, ranks=ranks)
