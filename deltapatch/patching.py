"""Train one Δ-patch for one task: the capability the CLI, the flows and the bench all call.

    result = train_patch(params, task_data, out_dir=Path("patches/glyphs"))
    result.metrics["patch_acc"], result.base_check.bit_identical
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltapatch.config import section
from deltapatch.data.dataset import TaskData
from deltapatch.data.sources import base_eval_data
from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.importance import with_importance_ranks
from deltapatch.delta.kinds.lowrank import IMPORTANCE, LowRankConfig
from deltapatch.delta.patch import PatchMeta, patch_bytes, save_patch
from deltapatch.evaluate import BaseCheck, base_check, pristine_logits
from deltapatch.models.base import BaseModel, load_base, preprocessing
from deltapatch.train import (
    EpochRecord,
    FitResult,
    Normalizer,
    Trainable,
    TrainSettings,
    accuracy,
    apply_threads,
    fit,
    predict_logits,
    resolve_device,
)

log = logging.getLogger(__name__)


@dataclass
class DeltaSettings:
    """params.yaml `delta:` section: the kind, the patch's parameter budget (None: off, the default)
    and each kind's options."""

    kind: str = "channel"
    budget_pct: float | None = None
    lowrank: dict[str, Any] = field(default_factory=dict)
    channel: dict[str, Any] = field(default_factory=dict)

    def options(self, kind: str) -> dict[str, Any]:
        return {"budget_pct": self.budget_pct, **(getattr(self, kind.replace("-", "_"), None) or {})}


@dataclass
class PatchResult:
    task: str
    patch_dir: Path
    meta: PatchMeta
    fit: FitResult
    base_check: BaseCheck
    metrics: dict[str, float]


@dataclass
class PatchSession:
    """A base model wrapped as a DeltaNetwork, with the pristine base logits to compare against."""

    base: BaseModel
    net: DeltaNetwork
    norm: Normalizer
    base_data: TaskData
    reference_logits: torch.Tensor
    device: torch.device


def open_session(params: dict[str, Any], device: torch.device | None = None, *,
                 net: DeltaNetwork | None = None) -> PatchSession:
    """Load the base, record its pristine test logits, then wrap it for patching.

    `net`: an existing DeltaNetwork to use instead of wrapping the loaded base (the gate checks a
    network it is given against a freshly loaded pristine base); `device` then defaults to its device.
    """
    train_settings = section(params, "train", TrainSettings)
    apply_threads(train_settings)
    if device is None:
        device = next(net.parameters()).device if net is not None else resolve_device(train_settings.device)
    base = load_base(params, device)
    norm = Normalizer(base.settings.mean, base.settings.std, device)
    base_data = base_eval_data(params, base)
    reference = pristine_logits(base.model, base_data.test, norm)
    return PatchSession(base, DeltaNetwork(base.model) if net is None else net, norm, base_data, reference, device)


def budget_note(net: DeltaNetwork, task: str, num_classes: int) -> str:
    """A warning when `task`'s budget left layers without a Δ (thin networks: measured on
    MobileNetV3-small, docs/benchmark.md), naming the budget from which every layer gets one."""
    config = net.task_configs[task]
    missing = config.layers_without_delta()
    if not missing or (isinstance(config, LowRankConfig) and config.allocation == IMPORTANCE):
        return ""  # importance (asked, or chosen by auto) picked the layers that go without: that is the point of it
    layout = net.patch_layout(num_classes)
    return (f"delta.budget_pct {config.budget_pct:g} leaves {missing} of {len(layout.layers)} layers of this base "
            f"without a Δ (its norm layers and head alone take {100.0 * layout.fixed_params / layout.base_params:.2f} % "
            f"of its parameters) and accuracy suffers: set delta.lowrank.allocation: auto or importance (the budget goes to "
            f"the layers that matter for the task) or delta.budget_pct to at least "
            f"{math.ceil(10.0 * layout.full_coverage_pct()) / 10.0:g} (a Δ on every layer)")


def patch_trainable(net: DeltaNetwork, task: str) -> Trainable:
    net.select(task)
    return Trainable(
        module=net,
        parameters=net.task_parameters(task),
        state_dict=lambda: net.task_state_dict(task),
        load_state_dict=lambda state: net.load_task_state_dict(task, state),
        groups=net.task_parameter_groups(task),
    )


def train_patch(params: dict[str, Any], data: TaskData, *, out_dir: Path, kind: str | None = None,
                session: PatchSession | None = None, checkpoint: Path | None = None, progress: bool = True,
                on_epoch: Callable[[EpochRecord], None] | None = None, data_version: str = "",
                epochs: int | None = None) -> PatchResult:
    """Train `data.name`'s patch on the frozen base, check the base route, save the patch."""
    session = session or open_session(params)
    delta = section(params, "delta", DeltaSettings)
    kind = kind or delta.kind
    settings = section(params, "train", TrainSettings)
    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    net, task = session.net, data.name
    if task in net.tasks:
        net.remove_task(task)
    config = with_importance_ranks(net, task, data, make_config(kind, delta.options(kind)), settings, session.norm,
                                   seed=seed, progress=progress)
    net.add_task(task, data.num_classes, config)
    note = budget_note(net, task, data.num_classes)
    if note:
        log.warning(note)
    started = time.perf_counter()
    fitted = fit(patch_trainable(net, task), data, settings, session.norm, seed=seed, checkpoint=checkpoint,
                 desc=f"Δ-patch {task} ({kind})", progress=progress, on_epoch=on_epoch, epochs=epochs)
    train_seconds = time.perf_counter() - started
    net.eval().select(task)
    test_acc = accuracy(predict_logits(net, data.test, session.norm, desc=f"test {task}" if progress else None), data.test.labels)
    check = base_check(net, session.reference_logits, session.base_data.test, session.norm)
    trainable, total = net.parameter_counts(task)
    meta = PatchMeta(
        task=task, class_names=data.class_names, delta_kind=kind, delta_config=net.task_configs[task].to_dict(),
        base_arch=session.base.settings.arch, base_fingerprint=net.base_fingerprint,
        input_size=session.base.settings.input_size, mean=session.base.settings.mean, std=session.base.settings.std,
        data_version=data_version, preprocessing=preprocessing(session.base.settings),
    )
    meta.metrics = {
        "patch_acc": test_acc,
        "val_acc": fitted.history[-1].val_acc if fitted.history else float("nan"),
        "base_acc": check.base_acc,
        "base_acc_change": check.acc_change,
        "base_logits_max_abs_diff": check.max_abs_diff,
        "trainable_params": float(trainable),
        "trainable_pct": 100.0 * trainable / total,
        "train_s_per_epoch": fitted.seconds_per_epoch,
        "train_seconds": train_seconds,
        "layers_without_delta": float(net.task_configs[task].layers_without_delta()),
    }
    _save_with_size(net, meta, out_dir)
    return PatchResult(task, Path(out_dir), meta, fitted, check, meta.metrics)


def _save_with_size(net: DeltaNetwork, meta: PatchMeta, out_dir: Path) -> None:
    """Save so that patch.json's metrics record the final size of the patch files themselves."""
    size = 0.0
    for _ in range(3):  # converges once the number's width stops changing
        meta.metrics["patch_bytes"] = size
        save_patch(net, meta, out_dir)
        if float(patch_bytes(out_dir)) == size:
            return
        size = float(patch_bytes(out_dir))
