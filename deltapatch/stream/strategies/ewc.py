"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al. 2017), as Avalanche's `EWCPlugin` does it.

After each task (the base task included, at the start) the importance of every backbone weight is
the squared gradient of the task's cross-entropy, averaged over the task's training mini-batches
with the model in eval mode; the weights are saved as that task's anchor. Training a later task
adds λ · Σ_tasks Σ_w importance · (w − anchor)² to the loss (`mode: separate`, one term per earlier
task, Avalanche's default) or keeps one decayed sum of importances anchored at the last weights
(`mode: online`, importance ← decay·importance + new). Everything kept on disk: the network plus
the importances and anchors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deltapatch.baselines.base import save_tensors
from deltapatch.config import ConfigError
from deltapatch.data.dataset import TaskData
from deltapatch.delta.routing import BASE
from deltapatch.stream.strategies.base import MultiHeadModel, StrategySettings, StreamContext, TaskModule
from deltapatch.stream.strategies.naive import NaiveFineTune
from deltapatch.train import batches

MODES = ("separate", "online")


@dataclass
class EwcSettings(StrategySettings):
    ewc_lambda: float = 1.0e6  # the importances of a well-fit base are tiny (Σ ≈ 5e-4): see docs/benchmark.md
    mode: str = "separate"
    decay_factor: float = 1.0  # online mode: weight of the older importances

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"params.yaml stream.strategy_options.ewc.mode: '{self.mode}'; use one of {list(MODES)}")


@dataclass
class Consolidated:
    """One EWC term: per backbone parameter name, its importance and its anchor value."""

    name: str
    importance: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]


class Ewc(NaiveFineTune):
    name = "ewc"
    settings_class = EwcSettings
    settings: EwcSettings

    def start(self, base: TaskData) -> None:
        super().start(base)
        self.terms: list[Consolidated] = []
        self.consolidate(base, BASE)

    def after_fit(self, data: TaskData) -> None:
        self.consolidate(data, data.name)

    def consolidate(self, data: TaskData, task: str) -> None:
        importance = importances(self.model, data, task, self.context)
        anchor = {n: p.detach().clone() for n, p in self.model.backbone.named_parameters()}
        if self.settings.mode == "online" and self.terms:
            decay = float(self.settings.decay_factor)
            old = self.terms[-1].importance
            importance = {n: decay * old[n] + value for n, value in importance.items()}
            self.terms = [Consolidated("online", importance, anchor)]
        else:
            self.terms.append(Consolidated("online" if self.settings.mode == "online" else task, importance, anchor))

    def task_module(self, data: TaskData) -> TaskModule:
        return _EwcModule(self.model, data.name, self)

    def penalty(self) -> torch.Tensor:
        """λ · Σ_terms Σ_w importance · (w − anchor)² over the backbone's parameters."""
        total = torch.zeros((), device=self.context.device)
        for name, param in self.model.backbone.named_parameters():
            for term in self.terms:
                total = total + (term.importance[name] * (param - term.anchor[name]).pow(2)).sum()
        return float(self.settings.ewc_lambda) * total

    def save(self, folder: Path) -> None:
        super().save(folder)
        for index, term in enumerate(self.terms):
            path = Path(folder) / "ewc" / f"{index:02d}-{term.name}.safetensors"
            if term.name == "online" or not path.is_file():  # separate terms never change once written
                tensors = {f"importance.{k}": v for k, v in term.importance.items()}
                tensors.update({f"anchor.{k}": v for k, v in term.anchor.items()})
                save_tensors(tensors, path)


class _EwcModule(TaskModule):
    def __init__(self, model: MultiHeadModel, task: str, strategy: Ewc) -> None:
        super().__init__(model, task)
        self.strategy = strategy

    def extra_loss(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.strategy.penalty()


def importances(model: MultiHeadModel, data: TaskData, task: str, context: StreamContext) -> dict[str, torch.Tensor]:
    """Mean over the training mini-batches of the squared gradient of the task's loss, per backbone
    parameter, in eval mode (Avalanche `EWCPlugin.compute_importances`)."""
    model.eval()
    params = dict(model.backbone.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for images, labels in batches(data.train, context.batch_size, shuffle=False):
        loss = F.cross_entropy(model.logits(context.norm(images), task).float(), labels.to(context.device))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads, strict=True):
            if grad is not None:
                total[name] += grad.detach().pow(2)
        count += 1
    return {n: v / max(1, count) for n, v in total.items()}
