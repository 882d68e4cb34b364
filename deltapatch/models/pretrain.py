"""Pre-train the embedded default base model on the base task when no weights exist yet, and
:func:`ensure_base`, the check every entry point that needs the base runs before doing any work."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import save_file
from torch import nn

from deltapatch.config import ConfigError, section, state_dir
from deltapatch.data.dataset import Split
from deltapatch.data.sources import BUILTIN_PREFIX, base_eval_data
from deltapatch.errors import DeltapatchError
from deltapatch.fingerprint import fingerprint
from deltapatch.models.base import base_settings, base_weights_path, build_architecture, write_sidecar
from deltapatch.train import (
    Normalizer,
    Trainable,
    TrainSettings,
    accuracy,
    apply_threads,
    batches,
    fit,
    predict_logits,
    resolve_device,
)


@dataclass
class PretrainSettings:
    """params.yaml `pretrain:` section: overrides of `train:` for pre-training the base, the least
    test accuracy above chance a base must reach to be saved, and the precise-BatchNorm step."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.0005
    min_steps: int = 0  # the patch recipe (train:) is not the base's: no step budget,
    label_smoothing: float = 0.0  # no smoothing, no augmentation unless asked for here
    augment_translate: float = 0.0
    augment_scale: float = 0.0
    min_gain_over_chance: float = 0.1
    # Precise BatchNorm after pre-training: N > 0 batches, 0 off, "auto" (every training batch, only
    # for nets whose BatchNorm averages move slowly: `needs_precise_batchnorm`).
    precise_bn_batches: int | str = "auto"

    def precise_batches(self, model: nn.Module) -> int | None:
        """How many training batches precise BN averages over for `model`: 0 = not applied, None = all."""
        if self.precise_bn_batches == "auto":
            return None if needs_precise_batchnorm(model) else 0
        if isinstance(self.precise_bn_batches, int) and self.precise_bn_batches >= 0:
            return self.precise_bn_batches
        raise ConfigError(f"params.yaml: pretrain.precise_bn_batches={self.precise_bn_batches!r} must be auto or an "
                          "integer ≥ 0")


class PretrainFailed(DeltapatchError):
    """Pre-training produced a base no better than chance; nothing was saved."""


def chance_accuracy(labels: torch.Tensor) -> float:
    """Accuracy of always answering the most frequent class (labels: (N,) int64)."""
    return float(labels.bincount().max()) / len(labels) if len(labels) else 0.0


# PyTorch's BatchNorm default. Families tuned for ImageNet-length schedules lower it (torchvision's
# MobileNetV3: 0.01), and after a pre-training of a few hundred steps their running
# averages still sit near the initial 0/1: the saved base scored chance in eval mode (measured:
# mobilenet_v3_small 0.097 with a training loss of 0.004) although it had learnt the task.
SLOW_BN_MOMENTUM = 0.1


def needs_precise_batchnorm(model: nn.Module) -> bool:
    """Whether some BatchNorm of `model` averages its statistics more slowly than PyTorch's default."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               and m.momentum is not None and m.momentum < SLOW_BN_MOMENTUM for m in model.modules())


def precise_batchnorm(model: nn.Module, split: Split, norm: Normalizer, batch_size: int,
                      max_batches: int | None = None) -> None:
    """Re-estimate every BatchNorm's running statistics as the exact average over `split` (its first
    `max_batches` batches; None: all) with the final weights ("precise BN"); see SLOW_BN_MOMENTUM for
    why. `pretrain.precise_bn_batches: auto` applies it only where `needs_precise_batchnorm`, so the
    default ResNet-18 base (momentum 0.1) is saved exactly as before."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    model.eval()  # dropout / stochastic depth off: only the BatchNorms see training-mode batches
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    with torch.no_grad():
        for index, (images, _) in enumerate(batches(split, batch_size, shuffle=False)):
            if max_batches is not None and index >= max_batches:
                break
            model(norm(images))
    for bn, momentum in zip(bns, saved, strict=True):
        bn.momentum = momentum
    model.eval()


def is_embedded_base(params: dict[str, Any]) -> bool:
    """The embedded default base: evaluated on a built-in set, so deltapatch can pre-train it itself."""
    return base_settings(params).eval_set.startswith(BUILTIN_PREFIX)


def missing_base_error(params: dict[str, Any], what_happened: str) -> ConfigError:
    """The one error for base weights that are not there (ensure_base before any work; the training
    key's fingerprint when the file went away later)."""
    settings = base_settings(params)
    weights = base_weights_path(params)
    if is_embedded_base(params):
        return ConfigError(f"base weights {weights} not found (params.yaml base.weights, the embedded default); "
                           f"{what_happened}", hint="`deltapatch pretrain` writes it again")
    return ConfigError(
        f"base weights {weights} not found (params.yaml base.weights, your own base model with "
        f"base.eval_set {settings.eval_set}); {what_happened}",
        hint=f"put the weights file at {weights}, or point base.weights in params.yaml at it",
    )


def ensure_base(params: dict[str, Any], *, progress: bool = True,
                say: Callable[[str], None] | None = None) -> Path:
    """Make sure the base weights exist before any work starts; returns their path.

    - present: nothing to do;
    - missing, embedded default (``base.eval_set: builtin:…``): pre-train it now (once; concurrent
      callers wait on a lock), with a progress bar, saying so;
    - missing, a user's base: ConfigError naming the file and the fix — nothing was ingested yet.
    """
    say = say or (lambda _message: None)
    settings = base_settings(params)
    weights = base_weights_path(params)
    if weights.is_file():
        return weights
    if not is_embedded_base(params):
        raise missing_base_error(params, "stopped before ingesting or training anything")
    lock = state_dir(params) / "locks" / "pretrain.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if weights.is_file():  # pre-trained by another process meanwhile
            return weights
        say(f"no base model yet: pre-training the embedded default ({settings.arch} on "
            f"{settings.eval_set[len(BUILTIN_PREFIX):]}) into {weights}, once (a few minutes on a CPU)")
        path = pretrain_base(params, progress=progress)
    say(f"base model ready: {path}")
    return path


def pretrain_base(params: dict[str, Any], *, progress: bool = True, force: bool = False) -> Path:
    """Train base.arch on the base task and write base.weights (+ sidecar). Returns the path.

    Existing weights are kept unless `force`: a base model is an identity that patches refer to.
    """

    settings = base_settings(params)
    weights = base_weights_path(params)
    if weights.exists() and not force:
        return weights
    # Every `pretrain:` field but the acceptance threshold and precise BN overrides the `train:` field
    # of the same name.
    pretrain = section(params, "pretrain", PretrainSettings)
    overrides = dataclasses.asdict(pretrain)
    for own in ("min_gain_over_chance", "precise_bn_batches"):
        overrides.pop(own)
    train_settings = dataclasses.replace(section(params, "train", TrainSettings), **overrides)
    apply_threads(train_settings)
    device = resolve_device(train_settings.device)
    seed = int(params.get("seed", 0))
    torch.manual_seed(seed)
    data = base_eval_data(params)
    model = build_architecture(settings, data.num_classes).to(device)
    norm = Normalizer(settings.mean, settings.std, device)
    trainable = Trainable(model, list(model.parameters()), model.state_dict, model.load_state_dict)
    fit(trainable, data, train_settings, norm, seed=seed, desc=f"pretrain {settings.arch} on {data.name}", progress=progress)
    precise = pretrain.precise_batches(model)
    if precise != 0:
        precise_batchnorm(model, data.train, norm, train_settings.batch_size, precise)
    test_acc = accuracy(predict_logits(model, data.test, norm), data.test.labels)
    chance = chance_accuracy(data.test.labels)
    if test_acc < chance + pretrain.min_gain_over_chance:
        raise PretrainFailed(
            f"pre-training {settings.arch} on {data.name} reached test accuracy {test_acc:.3f}, within "
            f"{pretrain.min_gain_over_chance:g} of chance ({chance:.3f}), so {weights} was NOT written: patches "
            f"on such a base fail their gate. Change params.yaml: pretrain.lr (now {train_settings.lr:g}; "
            f"try 0.001–0.003), pretrain.epochs (now {train_settings.epochs}; try more), or base.small_input_stem "
            f"(now {settings.small_input_stem}; true adapts the stem to {settings.input_size}×{settings.input_size} "
            f"inputs), or pretrain.precise_bn_batches (now {pretrain.precise_bn_batches}; auto or N > 0 "
            f"re-estimates the BatchNorm statistics: a low training loss with chance test accuracy is that); "
            f"or bring trained weights (base.weights)"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    write_sidecar(weights, settings, data.class_names, fingerprint(state), {"test_acc": test_acc})
    tmp.replace(weights)
    return weights
