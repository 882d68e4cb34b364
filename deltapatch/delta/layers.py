"""Layer wrappers that put per-task Δs, BatchNorms and heads beside the frozen originals.

Each wrapper keeps the original module untouched as `frozen` and runs exactly that module on the
base route, which is what makes the base path bit-identical to the unwrapped network.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from deltapatch.delta.kinds import DeltaConfig, layer_class
from deltapatch.delta.kinds.base import DeltaLayer, FrozenLayer
from deltapatch.delta.routing import BASE, Router


def _scatter(groups: list[tuple[str, torch.Tensor]], outputs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Reassemble per-group outputs (n_t, ...) into one (N, ...) tensor in sample order."""
    out = like.new_empty((like.shape[0], *next(iter(outputs.values())).shape[1:]))
    for task, index in groups:
        out[index] = outputs[task].to(out.dtype)
    return out


class TaskRoutedModule(nn.Module, ABC):
    """Common part: the frozen original, one child per task, and the shared router.

    Every wrapper takes the same `add_task` keywords and uses what it needs; `role` names what its
    per-task children are in a patch ("delta", "norm" or "head")."""

    role: ClassVar[str]
    router: Router

    def __init__(self, frozen: nn.Module, router: Router) -> None:
        super().__init__()
        self.frozen = frozen
        self.per_task = nn.ModuleDict()
        # A plain attribute (not a submodule): the router is shared by all wrappers.
        object.__setattr__(self, "router", router)

    @abstractmethod
    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        """Create `task`'s child beside the frozen original (zero-initialised: the base function)."""

    def remove_task(self, task: str) -> None:
        if task in self.per_task:
            del self.per_task[task]

    def _module(self, task: str) -> nn.Module:
        """The module that serves `task`: the frozen original for the base route."""
        return self.frozen if task == BASE else self.per_task[task]


class DeltaWrapped(TaskRoutedModule):
    """A frozen Conv2d/Linear plus one Δ layer per task.

    forward: x (N, C_in, H, W) or (N, F_in) → same shape as frozen(x).
    """

    role = "delta"
    frozen: FrozenLayer

    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        self.per_task[task] = layer_class(config.kind)(self.frozen, config)

    def delta(self, task: str) -> DeltaLayer:
        """`task`'s Δ layer (typed: ModuleDict hands back a plain Module)."""
        layer = self.per_task[task]
        assert isinstance(layer, DeltaLayer)  # add_task puts nothing else here
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        groups = router.groups
        frozen_out = self.frozen(x)
        if router.merged is not None or (groups is None and router.task == BASE):
            return frozen_out  # base route (or Δ already folded into frozen's weights)
        if groups is None:
            return self.per_task[router.task](x, frozen_out, self.frozen)
        out = frozen_out.clone()
        for task, index in groups:
            if task != BASE:
                out[index] = self.per_task[task](x[index], frozen_out[index], self.frozen).to(out.dtype)
        return out


# Normalisation layers a task gets its own copy of. BatchNorm: own affine parameters AND own running
# statistics (the Δ-Networks recipe; the base statistics are never updated). LayerNorm (ConvNeXt),
# GroupNorm, InstanceNorm: own affine parameters; their statistics are computed per sample, so there
# is nothing frozen to keep apart. A norm layer with no parameters and no buffers is left shared.
# A task's BatchNorm statistics move with momentum ≥ TASK_BN_MOMENTUM: a patch trains for tens to
# thousands of steps, and a base built with 0.01 (MobileNetV3) would leave them mostly the base's.
TASK_BN_MOMENTUM = 0.1
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm,
)


def is_task_norm(module: nn.Module) -> bool:
    """Whether `module` is a norm layer with something a task can own (affine or statistics)."""
    has_state = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    return isinstance(module, NORM_TYPES) and has_state


class TaskNorm(TaskRoutedModule):
    """Per-task copy of a norm layer (see NORM_TYPES); the base layer is never updated.

    forward: x (N, ...) → (N, ...), the layer's own layout (channels-first or channels-last).
    """

    role = "norm"

    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        own = copy.deepcopy(self.frozen)
        for param in own.parameters():
            param.requires_grad_(True)
        if isinstance(own, nn.modules.batchnorm._BatchNorm):
            own.momentum = max(own.momentum or 0.0, TASK_BN_MOMENTUM)
        self.per_task[task] = own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        groups = router.groups
        if groups is None:
            return self._module(router.task)(x)
        outputs = {task: self._module(task)(x[index]) for task, index in groups}
        return _scatter(groups, outputs, x)


class TaskHeads(TaskRoutedModule):
    """The classifier: the frozen base head plus one new Linear head per task.

    forward: features (N, F) → logits (N, K). In a mixed batch K is the largest class count among
    the batch's tasks and each row is padded with -inf beyond its own task's K_t.
    """

    role = "head"
    frozen: nn.Linear

    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        self.per_task[task] = nn.Linear(self.frozen.in_features, num_classes).to(self.frozen.weight.device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        router = self.router
        groups = router.groups
        if groups is None:
            return self._module(router.task)(features)
        outputs = {task: self._module(task)(features[index]) for task, index in groups}
        width = max(o.shape[1] for o in outputs.values())
        logits = features.new_full((features.shape[0], width), float("-inf"))
        for task, index in groups:
            logits[index, : outputs[task].shape[1]] = outputs[task].to(logits.dtype)
        return logits


class LooseParameter(nn.Module):
    """A parameter the base holds directly on a block rather than in a layer (ConvNeXt's per-channel
    `layer_scale`), as a module, so that a task can own a copy of it like a norm layer's affine."""

    def __init__(self, value: nn.Parameter) -> None:
        super().__init__()
        self.value = value


def is_channel_vector(param: nn.Parameter) -> bool:
    """Whether `param` is a per-channel vector (one dimension > 1, e.g. (C, 1, 1)): the loose
    parameters a task gets its own copy of. Anything else (a position table, …) stays shared."""
    return sum(size > 1 for size in param.shape) == 1


class TaskScale(TaskRoutedModule):
    """Per-task copy of a loose per-channel parameter, owned and trained like a norm layer's
    affine parameters (role "norm"). In ConvNeXt every block's residual branch is multiplied by
    its frozen `layer_scale` (0.004–0.005 after our pre-training), which would scale whatever a Δ
    inside the block adds down ~200×; a task's own copy lets it turn the branch up (docs/benchmark.md).

    `value()` replaces the attribute on its owner (`route_loose_parameter`): the base route gets
    the frozen tensor itself (bit-identical), a task its copy, a mixed batch one row per sample,
    (N, *shape), which broadcasts against the block's (N, C, H, W) output.
    """

    role = "norm"
    frozen: LooseParameter

    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        own = copy.deepcopy(self.frozen)
        own.value.requires_grad_(True)
        self.per_task[task] = own

    def scale(self, task: str) -> nn.Parameter:
        """`task`'s tensor (the frozen one for the base route)."""
        holder = self._module(task)
        assert isinstance(holder, LooseParameter)  # add_task puts nothing else here
        return holder.value

    def value(self) -> torch.Tensor:
        router = self.router
        groups = router.groups
        if groups is None:
            return self.scale(router.task)
        frozen = self.frozen.value
        out = frozen.new_empty((sum(len(index) for _, index in groups), *frozen.shape))
        for task, index in groups:
            out[index] = self.scale(task).to(out.dtype)
        return out


def route_loose_parameter(owner: nn.Module, name: str, router: Router) -> TaskScale:
    """Move `owner.<name>` (a per-channel nn.Parameter) into a TaskScale registered under the same
    name, and give `owner` a subclass whose `<name>` attribute is the routed value: the block's own
    forward (`self.layer_scale * ...`) then reads the active task's copy, unchanged."""
    param = owner._parameters.pop(name)
    assert param is not None  # the caller found it there
    wrapper = TaskScale(LooseParameter(param), router)
    owner.add_module(name, wrapper)
    owner.__class__ = _routed_class(type(owner), name)
    return wrapper


_ROUTED_CLASSES: dict[tuple[type[nn.Module], str], type[nn.Module]] = {}


def _routed_class(cls: type[nn.Module], name: str) -> type[nn.Module]:
    """`cls` with attribute `name` read from its TaskScale child (one class per (cls, name))."""
    if (cls, name) not in _ROUTED_CLASSES:
        def routed_value(self: nn.Module) -> torch.Tensor:
            scale = self._modules[name]
            assert isinstance(scale, TaskScale)
            return scale.value()

        _ROUTED_CLASSES[cls, name] = type(f"Routed{cls.__name__}", (cls,),
                                          {name: property(routed_value), "__module__": __name__})
    return _ROUTED_CLASSES[cls, name]
