"""The interface every benchmarked method implements, in the style of PEFT's tuners.

A `Method` adapts the shared frozen base model to one patch task. The bench drives every method
through the same steps, so they differ only in what they train and how they serve:

    method = METHODS[name](context, settings)
    trainable = method.prepare(task_data)        # build the per-task model; what `fit` trains
    fit(trainable, ...)                          # the one training loop (deltapatch.train.fit)
    method.after_fit(task_data)                  # e.g. PAINT's choice of α on the val split
    method.task_forward(), method.base_forward() # serving paths: the task, and "the base task"
    method.save(folder) -> bytes on disk         # the real files this method ships per task
    with method.merged() as forward: ...         # task path with everything folded in, or None

Every forward maps normalised images (N, 3, H, W) to logits (N, K).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from deltapatch.data.dataset import TaskData
from deltapatch.delta.network import final_linear_name
from deltapatch.models.base import BaseModel
from deltapatch.train import Normalizer, Trainable, TrainSettings

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BenchContext:
    """What every method shares on one bench run: the pristine base and how to feed it."""

    params: dict[str, Any]
    base: BaseModel
    norm: Normalizer
    base_data: TaskData
    reference_logits: torch.Tensor  # pristine base logits on base_data.test, (N_base, K_base)
    device: torch.device
    # The run's training recipe (the bench's epochs and step budget applied): what an importance pilot
    # trains with. None: params.yaml `train:` as is.
    recipe: TrainSettings | None = None
    # Importance ranks per (task, Δ kind, seed): the pilot does not depend on the lr, so the points of
    # the lr grid share one pilot instead of running one each.
    pilot_ranks: dict[tuple[str, str, int], Any] = field(default_factory=dict)


@dataclass
class MethodSettings:
    """Per-method options from params.yaml `bench.method_options.<name>`; `lr` overrides train.lr."""

    lr: float | None = None


class Method:
    """One way of adapting the base model to a task. Subclasses set `name` and `settings_class`."""

    name: ClassVar[str] = ""
    settings_class: ClassVar[type[MethodSettings]] = MethodSettings
    # Methods with the same non-empty key train identically (same module, same loop), so the bench
    # trains once and hands the trained state to the others (PAINT = full-ft + interpolation).
    training_key: ClassVar[str] = ""

    def __init__(self, context: BenchContext, settings: MethodSettings | None = None) -> None:
        self.context = context
        self.settings = settings or self.settings_class()
        self.task = ""

    def prepare(self, data: TaskData) -> Trainable:
        """Build the model for `data.name` (never touching context.base.model) and return what to train."""
        raise NotImplementedError

    def after_fit(self, data: TaskData) -> None:
        """Hook run after training (default: nothing)."""

    def task_forward(self) -> Forward:
        """The task's serving path, unmerged (eval mode)."""
        raise NotImplementedError

    def base_forward(self) -> Forward:
        """What this method serves when asked for the base task."""
        raise NotImplementedError

    def save(self, out_dir: Path) -> int:
        """Write the files this method must store per task into `out_dir`; return their size on disk."""
        raise NotImplementedError

    @contextlib.contextmanager
    def merged(self) -> Iterator[Forward | None]:
        """The task path with its adaptation folded into plain weights; None where no such thing."""
        yield None

    def trainable_params(self) -> int:
        raise NotImplementedError


# ---------------------------------------------------------------- helpers shared by the baselines
class Classifier(nn.Module):
    """A backbone (the base model with its head replaced by Identity) with a task head and the
    original base head beside it. forward: (N, 3, H, W) → (N, K_task); forward_base → (N, K_base).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, base_head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Kept out of the parameter tree (not a submodule): never trained, never saved with the task.
        object.__setattr__(self, "base_head", base_head)
        self.base_head: nn.Linear  # (for the type checker: set above, outside nn.Module's registry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def forward_base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_head(self.backbone(x))


def split_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """(dotted name, module) of the model's classifier: its last nn.Linear."""
    name = final_linear_name(model)
    return name, model.get_submodule(name)  # type: ignore[return-value]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def shared_copy(model: nn.Module, share: Callable[[nn.Module], bool]) -> nn.Module:
    """Deep copy of `model` whose modules selected by `share` keep the very same tensors (so the
    weights exist once in memory, as they would when one backbone serves several tasks)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        if share(module):
            for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
                memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def classifier_from(backbone_source: nn.Module, num_classes: int, base_head: nn.Linear,
                    device: torch.device, cls: type[Classifier] = Classifier) -> Classifier:
    """Wrap a (copied) base model as a `cls` with a fresh head of `num_classes` outputs."""
    name, head = split_head(backbone_source)
    replace_module(backbone_source, name, nn.Identity())
    new_head = nn.Linear(head.in_features, num_classes).to(device)
    return cls(backbone_source, new_head, base_head)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write tensors as safetensors (shared storage de-duplicated by copying); return bytes on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    return path.stat().st_size


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def count_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def trainable_of(model: Classifier) -> Trainable:
    """A Trainable over `model`'s parameters with requires_grad (groups "body" and "head"),
    saving/restoring its full state."""
    return Trainable(
        module=model,
        parameters=[p for p in model.parameters() if p.requires_grad],
        state_dict=model.state_dict,
        load_state_dict=model.load_state_dict,
        groups={"body": list(model.backbone.parameters()), "head": list(model.head.parameters())},
    )
