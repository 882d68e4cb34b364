"""`delta`: Δ-patching. One frozen base, one Δ-patch per task (the default kind, `delta.kind`).

Each task adds a zero-initialised Δ, its own BatchNorms and its own head to a `DeltaNetwork` over a
copy of the base; only that patch trains (`patch_trainable`, the same one `train_patch` uses).
Earlier patches and the base route are other modules, never touched again, so forgetting is
impossible by construction, and the base route stays bit-identical to the base model. Kept on
disk: the base weights file and one `save_patch` folder per task.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltapatch.baselines.base import Forward
from deltapatch.config import section
from deltapatch.data.dataset import TaskData
from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.layers import TaskHeads
from deltapatch.delta.patch import PatchMeta, save_patch
from deltapatch.patching import DeltaSettings, patch_trainable
from deltapatch.stream.strategies.base import Strategy, StrategySettings
from deltapatch.train import Trainable


@dataclass
class DeltaStreamSettings(StrategySettings):
    kind: str | None = None  # None: params.yaml delta.kind
    options: dict[str, Any] = field(default_factory=dict)  # override delta.<kind> for the stream only


class DeltaPatching(Strategy):
    name = "delta"
    settings_class = DeltaStreamSettings
    settings: DeltaStreamSettings

    def start(self, base: TaskData) -> None:
        delta = section(self.context.params, "delta", DeltaSettings)
        self.kind = self.settings.kind or delta.kind
        self.options = {**delta.options(self.kind), **self.settings.options}
        # DeltaNetwork wraps in place: wrap a copy, so the shared pristine base stays unwrapped.
        self.net = DeltaNetwork(copy.deepcopy(self.context.base.model))
        self.class_names: dict[str, list[str]] = {}
        self.saved: set[str] = set()

    def prepare(self, data: TaskData) -> Trainable:
        self.tasks.append(data.name)
        self.class_names[data.name] = data.class_names
        self.net.add_task(data.name, data.num_classes, make_config(self.kind, self.options))
        return patch_trainable(self.net, data.name)

    def forward(self, task: str) -> Forward:
        net = self.net.eval()

        def forward(x: torch.Tensor) -> torch.Tensor:
            return net(x, tasks=[task] * x.shape[0])  # routes this call only (BASE: the untouched base)

        return forward

    def head(self, task: str) -> nn.Linear:
        heads = self.net.model.get_submodule(self.net.head_name)
        assert isinstance(heads, TaskHeads)
        return heads.per_task[task]  # type: ignore[return-value]

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        base = self.context.base
        target = folder / base.weights_path.name
        if not target.is_file():  # the base model itself is stored once, as the file it came in
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base.weights_path, target)
        for task in self.tasks:
            if task in self.saved:
                continue  # a patch never changes once its task is learned
            meta = PatchMeta(
                task=task, class_names=self.class_names[task], delta_kind=self.kind,
                delta_config=make_config(self.kind, self.options).to_dict(), base_arch=base.settings.arch,
                base_fingerprint=self.net.base_fingerprint, input_size=base.settings.input_size,
                mean=base.settings.mean, std=base.settings.std,
            )
            save_patch(self.net, meta, folder / "patches" / task)
            self.saved.add(task)
