"""`delta-channel` / `delta-lowrank`: deltapatch's own Δ-patches, through DeltaNetwork and the patch
format (no Δ code here). The base route is `select("base")`, bit-identical to the base model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltapatch.baselines.base import Forward, Method, MethodSettings
from deltapatch.config import section
from deltapatch.data.dataset import TaskData
from deltapatch.delta import BASE, DeltaNetwork, make_config
from deltapatch.delta.importance import with_importance_ranks
from deltapatch.delta.patch import PatchMeta, patch_bytes, save_patch
from deltapatch.models.base import preprocessing
from deltapatch.patching import DeltaSettings, patch_trainable
from deltapatch.train import Trainable, TrainSettings


@dataclass
class DeltaMethodSettings(MethodSettings):
    """`options` override params.yaml `delta.<kind>` for the bench only (empty: use them as is)."""

    options: dict[str, Any] = field(default_factory=dict)


class DeltaMethod(Method):
    """A Δ kind; subclasses set `kind`."""

    settings_class = DeltaMethodSettings
    settings: DeltaMethodSettings
    kind = ""

    def options(self) -> dict[str, Any]:
        delta = section(self.context.params, "delta", DeltaSettings)
        return {**delta.options(self.kind), **self.settings.options}

    def prepare(self, data: TaskData) -> Trainable:
        self.task = data.name
        # DeltaNetwork wraps in place: wrap a copy, so the shared pristine base stays unwrapped.
        self.net = DeltaNetwork(copy.deepcopy(self.context.base.model))
        # `allocation: importance`: the pilot trains with the run's recipe at train.lr (not the lr point),
        # once per task and kind: every lr point of the grid reuses its ranks.
        seed = int(self.context.params.get("seed", 0))
        key = (self.task, self.kind, seed)
        config = self.context.pilot_ranks.get(key)
        if config is None:
            recipe = self.context.recipe or section(self.context.params, "train", TrainSettings)
            config = with_importance_ranks(self.net, self.task, data, make_config(self.kind, self.options()),
                                           recipe, self.context.norm, seed=seed)
            self.context.pilot_ranks[key] = config
        self.net.add_task(self.task, data.num_classes, config)
        self.class_names = data.class_names
        return patch_trainable(self.net, self.task)

    def task_forward(self) -> Forward:
        return self.net.eval().select(self.task)

    def base_forward(self) -> Forward:
        net = self.net.eval()

        def forward(x: torch.Tensor) -> torch.Tensor:
            return net(x, tasks=[BASE] * x.shape[0])  # routes this call only, leaves the selection

        return forward

    def save(self, out_dir: Path) -> int:
        base = self.context.base
        meta = PatchMeta(
            task=self.task, class_names=self.class_names, delta_kind=self.kind,
            delta_config=self.net.task_configs[self.task].to_dict(), base_arch=base.settings.arch,
            base_fingerprint=self.net.base_fingerprint, input_size=base.settings.input_size,
            mean=base.settings.mean, std=base.settings.std, preprocessing=preprocessing(base.settings),
        )
        save_patch(self.net, meta, Path(out_dir))
        return patch_bytes(Path(out_dir))

    @contextlib.contextmanager
    def merged(self) -> Iterator[Forward | None]:
        self.net.eval().merge(self.task)
        try:
            yield self.net
        finally:
            self.net.unmerge().select(self.task)

    def trainable_params(self) -> int:
        return self.net.parameter_counts(self.task)[0]


class DeltaChannel(DeltaMethod):
    name = "delta-channel"
    kind = "channel"


class DeltaLowRank(DeltaMethod):
    name = "delta-lowrank"
    kind = "lowrank"
