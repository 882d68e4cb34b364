"""`lwf`: Learning without Forgetting (Li & Hoiem 2017), as Avalanche's `LearningWithoutForgetting`.

Before a new task the current network is copied as a frozen teacher. While training the task,
every earlier head (the base head included) is distilled on the new task's images:
α · Σ_old heads KL(softmax(teacher/T) ‖ softmax(student/T)) (batch mean), on top of the new
head's cross-entropy. Old heads are trained by that term, as in Avalanche. Nothing extra is kept
on disk: the teacher is the network itself before the task.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deltapatch.data.dataset import TaskData
from deltapatch.stream.strategies.base import MultiHeadModel, StrategySettings, TaskModule
from deltapatch.stream.strategies.naive import NaiveFineTune
from deltapatch.train import Trainable


@dataclass
class LwfSettings(StrategySettings):
    alpha: float = 1.0  # weight of the distillation term (Avalanche's default)
    temperature: float = 2.0  # softmax temperature (Avalanche's default)


class Lwf(NaiveFineTune):
    name = "lwf"
    settings_class = LwfSettings
    settings: LwfSettings
    trains_old_heads = True

    def prepare(self, data: TaskData) -> Trainable:
        self.old_tasks = self.seen_tasks()
        self.teacher = copy.deepcopy(self.model).eval()
        self.teacher.requires_grad_(False)
        return super().prepare(data)

    def after_fit(self, data: TaskData) -> None:
        del self.teacher  # only needed while training

    def task_module(self, data: TaskData) -> TaskModule:
        return _LwfModule(self.model, data.name, self)

    def distillation(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        temperature = float(self.settings.temperature)
        with torch.no_grad():
            teacher_features = self.teacher.backbone(x)
        total = torch.zeros((), device=features.device)
        for task in self.old_tasks:
            student = self.model.heads[task](features).float() / temperature
            teacher = self.teacher.heads[task](teacher_features).float() / temperature
            total = total + F.kl_div(F.log_softmax(student, dim=1), F.softmax(teacher, dim=1), reduction="batchmean")
        return float(self.settings.alpha) * total


class _LwfModule(TaskModule):
    def __init__(self, model: MultiHeadModel, task: str, strategy: Lwf) -> None:
        super().__init__(model, task)
        self.strategy = strategy

    def extra_loss(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.strategy.distillation(x, features)
