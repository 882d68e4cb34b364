"""`paint` (Ilharco et al. 2022, "Patching open-vocabulary models by interpolating weights").

Fine-tune the whole model like `full-ft`, then serve θ(α) = (1 − α)·θ_base + α·θ_ft for the
backbone, with α chosen on the validation splits to maximise the mean of patch and base accuracy.
One set of shared weights: the base task is served by θ(α) with the original base head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deltapatch.baselines.base import MethodSettings
from deltapatch.baselines.full_ft import FullFineTune
from deltapatch.data.dataset import TaskData
from deltapatch.train import accuracy, predict_logits


@dataclass
class PaintSettings(MethodSettings):
    alphas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """(1 − α)·base + α·tuned per float tensor (exactly `base` at α = 0); integer buffers from base."""
    return {
        key: torch.lerp(value, tuned[key].to(value.dtype), alpha) if value.is_floating_point() else value.clone()
        for key, value in base.items()
    }


class Paint(FullFineTune):
    name = "paint"
    settings_class = PaintSettings
    settings: PaintSettings

    alpha: float = 1.0
    alpha_scores: dict[float, float]

    def after_fit(self, data: TaskData) -> None:
        """Pick α on the val splits (ties → the smaller α, i.e. closer to the base)."""
        backbone = self.model.backbone
        self.base_state = {k: v.detach().clone() for k, v in self.pristine_backbone_state().items()}
        self.tuned_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        self.alpha_scores = {}
        for alpha in sorted(self.settings.alphas):
            self.set_alpha(alpha)
            self.alpha_scores[alpha] = (self.val_accuracy(data) + self.base_val_accuracy()) / 2
        best = max(self.alpha_scores.values())
        self.set_alpha(min(a for a, s in self.alpha_scores.items() if s == best))

    def pristine_backbone_state(self) -> dict[str, torch.Tensor]:
        """The base model's state, keyed like the backbone (the head is not part of it)."""
        keys = set(self.model.backbone.state_dict())
        return {k: v for k, v in self.context.base.model.state_dict().items() if k in keys}

    @torch.no_grad()
    def set_alpha(self, alpha: float) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"PAINT α must lie in [0, 1], got {alpha}")
        self.model.backbone.load_state_dict(interpolate(self.base_state, self.tuned_state, alpha))
        self.alpha = alpha

    def val_accuracy(self, data: TaskData) -> float:
        norm = self.context.norm
        return accuracy(predict_logits(self.task_forward(), data.val, norm), data.val.labels)

    def base_val_accuracy(self) -> float:
        split = self.context.base_data.val
        return accuracy(predict_logits(self.base_forward(), split, self.context.norm), split.labels)
