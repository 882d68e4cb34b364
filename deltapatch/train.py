"""One training loop for every method (Δ-patches and baselines), with AMP, progress and resume.

A method hands `fit` a `Trainable`: the module to call, the parameters to optimise and how to
save/restore its trainable state. `fit` checkpoints after each epoch and, given the same
checkpoint path again, resumes after the last finished epoch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deltapatch.data.dataset import Split, TaskData
from deltapatch.errors import DeltapatchError


@dataclass
class TrainSettings:
    """params.yaml `train:` section: the recipe every method trains with (docs/benchmark.md)."""

    epochs: int = 6
    min_steps: int = 0  # step budget: tiny tasks get more epochs until this many optimiser steps
    batch_size: int = 64
    lr: float = 0.01
    lr_scale: dict[str, float] = field(default_factory=dict)  # per parameter group, e.g. {head: 10}
    warmup_fraction: float = 0.0  # linear warm-up over this share of the steps, then cosine decay
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment_translate: float = 0.0  # random shift, as a fraction of the image side (no flips)
    augment_scale: float = 0.0  # random zoom factor in [1 - s, 1 + s]
    device: str = "auto"
    amp: bool = True
    threads: int = 0
    # At most this many validation passes per training, spread evenly, the last epoch always (null:
    # after every epoch). Few-shot runs meet min_steps with hundreds of one-step epochs, where a
    # validation pass per epoch would cost more than the training itself.
    val_points: int | None = None

    def validates_after(self, epoch: int, epochs: int) -> bool:
        """Whether the loop scores validation after `epoch` (1-based) of `epochs`."""
        if self.val_points is None or self.val_points >= epochs:
            return True
        if self.val_points < 1:
            raise ValueError(f"train.val_points must be ≥ 1 or null, got {self.val_points}")
        return epoch == epochs or epoch * self.val_points // epochs != (epoch - 1) * self.val_points // epochs

    def planned_epochs(self, n_train: int, epochs: int | None = None) -> int:
        """Epochs to run: `epochs` (default self.epochs), raised until `min_steps` steps are taken."""
        epochs = self.epochs if epochs is None else epochs
        steps_per_epoch = max(1, math.ceil(n_train / self.batch_size))
        return max(epochs, math.ceil(self.min_steps / steps_per_epoch))


@dataclass
class Trainable:
    """What a method exposes to the loop. `module(x)` maps normalised (N, 3, H, W) to logits.

    `groups` names subsets of `parameters` (e.g. "delta", "norm", "head", "body") so that
    `TrainSettings.lr_scale` can give each its own learning rate; ungrouped parameters use `lr`.
    """

    module: nn.Module
    parameters: list[nn.Parameter]
    state_dict: Callable[[], dict[str, torch.Tensor]]
    load_state_dict: Callable[[dict[str, torch.Tensor]], None]
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_acc: float
    seconds: float


@dataclass
class FitResult:
    history: list[EpochRecord] = field(default_factory=list)
    resumed_from_epoch: int = 0

    @property
    def seconds_per_epoch(self) -> float:
        """Median epoch time of the epochs run in this call (robust to a slow first epoch)."""
        times = sorted(r.seconds for r in self.history if r.seconds > 0)
        return times[len(times) // 2] if times else float("nan")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeltapatchError(f"train.device is '{name}' but no CUDA device is visible; set train.device: auto or cpu")
    return torch.device(name)


def apply_threads(settings: TrainSettings) -> None:
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)


class Normalizer:
    """uint8 (N, 3, H, W) → float (N, 3, H, W) on `device`, scaled to [0,1] then standardised."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.device = device

    def __call__(self, images: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255.0)
        if augment is not None:
            x = augment(x)
        return (x - self.mean) / self.std


def random_affine(translate: float, scale: float, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A label-preserving augmentation of [0,1] images (N, 3, H, W): random shift and zoom per sample.

    No flips or rotations: they change the label of digits and letters. Borders are extended, so a
    shifted image gets no artificial black/grey frame. None when both amounts are 0.
    """
    if translate <= 0 and scale <= 0:
        return None

    def augment(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * translate)  # grid units span 2
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return augment


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked for (no loss scaling needed); a no-op on the CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def batches(split: Split, batch_size: int, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(split), generator=generator) if shuffle else torch.arange(len(split))
    for start in range(0, len(split), batch_size):
        index = order[start : start + batch_size]
        yield split.images[index], split.labels[index]


@torch.no_grad()
def predict_logits(forward: Callable[[torch.Tensor], torch.Tensor], split: Split, norm: Normalizer,
                   batch_size: int = 256, amp: bool = False, desc: str | None = None) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU, in the split's order."""
    outputs = []
    steps = batches(split, batch_size, shuffle=False)
    total = math.ceil(len(split) / batch_size)
    for images, _ in tqdm(steps, total=total, desc=desc, disable=desc is None, leave=False):
        with autocast(norm.device, amp):
            outputs.append(forward(norm(images)).float().cpu())
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def fit(trainable: Trainable, data: TaskData, settings: TrainSettings, norm: Normalizer, *, seed: int = 0,
        checkpoint: Path | None = None, desc: str = "train", progress: bool = True,
        on_epoch: Callable[[EpochRecord], None] | None = None, epochs: int | None = None) -> FitResult:
    """Train with Adam, linear warm-up then cosine decay; evaluate on val after each epoch;
    checkpoint and resume. `epochs` (default settings.epochs) is raised to meet settings.min_steps."""
    epochs = settings.planned_epochs(len(data.train), epochs)
    optimizer = make_optimizer(trainable, settings)
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    scheduler = warmup_cosine(optimizer, total_steps=max(1, epochs * steps_per_epoch),
                              warmup_steps=round(settings.warmup_fraction * epochs * steps_per_epoch))
    result = FitResult()
    start_epoch = _resume(checkpoint, trainable, optimizer, scheduler)
    result.resumed_from_epoch = start_epoch
    generator = torch.Generator().manual_seed(seed)
    for _ in range(start_epoch):  # keep the shuffling identical to an uninterrupted run
        torch.randperm(len(data.train), generator=generator)
    bar = tqdm(range(start_epoch, epochs), desc=desc, disable=not progress, unit="epoch", initial=start_epoch, total=epochs)
    for epoch in bar:
        # One augmentation stream per epoch: a resumed run draws exactly what it would have drawn.
        augment = random_affine(settings.augment_translate, settings.augment_scale,
                                torch.Generator().manual_seed(seed * 100_003 + epoch + 1))
        record = _train_epoch(trainable, data, settings, norm, optimizer, scheduler, generator, epoch, augment,
                              validate=settings.validates_after(epoch + 1, epochs))
        result.history.append(record)
        bar.set_postfix(loss=f"{record.train_loss:.3f}", val_acc=f"{record.val_acc:.3f}")
        if checkpoint is not None:
            _save_checkpoint(checkpoint, trainable, optimizer, scheduler, epoch + 1)
        if on_epoch is not None:
            on_epoch(record)
    trainable.module.eval()
    return result


def make_optimizer(trainable: Trainable, settings: TrainSettings) -> torch.optim.Optimizer:
    """Adam over the trainable parameters, one param group per named group (lr × lr_scale[name])."""
    params = [p for p in trainable.parameters if p.requires_grad]
    if not params:
        raise DeltapatchError("nothing to train: the method exposes no trainable parameters")
    # A scale for a group this method does not have (e.g. "delta" for full-ft) is simply unused.
    grouped: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, members in trainable.groups.items():
        members = [p for p in members if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in members)
        if members:
            grouped.append({"params": members, "lr": settings.lr * float(settings.lr_scale.get(name, 1.0)), "name": name})
    rest = [p for p in params if id(p) not in seen]
    if rest:
        grouped.append({"params": rest, "lr": settings.lr, "name": "other"})
    return torch.optim.Adam(grouped, lr=settings.lr, weight_decay=settings.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: linear from 1/(warmup+1) to 1 over `warmup_steps`, then cosine from 1 to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_epoch(trainable: Trainable, data: TaskData, settings: TrainSettings, norm: Normalizer,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 generator: torch.Generator, epoch: int,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None, validate: bool = True) -> EpochRecord:
    """One epoch; val_acc is NaN when `validate` is False (train.val_points)."""
    module = trainable.module
    module.train()
    started = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in batches(data.train, settings.batch_size, shuffle=True, generator=generator):
        labels = labels.to(norm.device)
        with autocast(norm.device, settings.amp):
            logits = module(norm(images, augment))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=settings.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    if norm.device.type == "cuda":
        torch.cuda.synchronize(norm.device)
    seconds = time.perf_counter() - started
    module.eval()
    val_acc = accuracy(predict_logits(module, data.val, norm, amp=settings.amp), data.val.labels) if validate else math.nan
    return EpochRecord(epoch + 1, loss_sum / seen, correct / seen, val_acc, seconds)


def _save_checkpoint(path: Path, trainable: Trainable, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, epochs_done: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epochs_done": epochs_done,
        "model": {k: v.detach().cpu() for k, v in trainable.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a torn checkpoint


def _resume(path: Path | None, trainable: Trainable, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    if path is None or not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainable.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epochs_done"])
