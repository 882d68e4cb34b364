"""`paint`: PAINT (Ilharco et al. 2022) applied sequentially, as the paper patches several tasks.

For each new task: fine-tune the current network (backbone + the task's new head) into θ_ft, then
serve θ(α) = (1 − α)·θ_prev + α·θ_ft for the backbone, where θ_prev is the backbone before this
task and α is chosen from a grid to maximise the mean validation accuracy over every task seen
so far (base, earlier tasks and the new one; ties → the smaller α, closer to θ_prev). The next
task starts from θ(α). One network is kept: the interpolated backbone and all heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltapatch.baselines.paint import interpolate
from deltapatch.data.dataset import Split, TaskData
from deltapatch.delta.routing import BASE
from deltapatch.stream.strategies.base import StrategySettings
from deltapatch.stream.strategies.naive import NaiveFineTune
from deltapatch.train import Trainable, accuracy, predict_logits


@dataclass
class SequentialPaintSettings(StrategySettings):
    alphas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])


@dataclass
class AlphaChoice:
    task: str
    alpha: float
    scores: dict[float, float]  # α → mean val accuracy over the tasks seen


class SequentialPaint(NaiveFineTune):
    name = "paint"
    settings_class = SequentialPaintSettings
    settings: SequentialPaintSettings

    def start(self, base: TaskData) -> None:
        super().start(base)
        self.val: dict[str, Split] = {BASE: base.val}
        self.choices: list[AlphaChoice] = []

    def prepare(self, data: TaskData) -> Trainable:
        self.previous = {k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()}
        self.val[data.name] = data.val
        return super().prepare(data)

    @torch.no_grad()
    def after_fit(self, data: TaskData) -> None:
        tuned = {k: v.detach().clone() for k, v in self.model.backbone.state_dict().items()}
        scores = {}
        for alpha in sorted(float(a) for a in self.settings.alphas):
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"PAINT α must lie in [0, 1], got {alpha}")
            self.model.backbone.load_state_dict(interpolate(self.previous, tuned, alpha))
            scores[alpha] = sum(self.val_accuracy(task) for task in self.seen_tasks()) / len(self.seen_tasks())
        best = max(scores.values())
        alpha = min(a for a, s in scores.items() if s == best)
        self.model.backbone.load_state_dict(interpolate(self.previous, tuned, alpha))
        self.choices.append(AlphaChoice(data.name, alpha, scores))
        del self.previous

    def val_accuracy(self, task: str) -> float:
        split = self.val[task]
        return accuracy(predict_logits(self.forward(task), split, self.context.norm), split.labels)

    def notes(self) -> list[str]:
        return [f"α after {c.task} = {c.alpha:g} (mean val accuracy over the tasks seen: "
                + ", ".join(f"{a:g}→{s:.3f}" for a, s in c.scores.items()) + ")" for c in self.choices]
