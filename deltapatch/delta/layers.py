"""Layer wrappers that put per-task Δs, BatchNorms and heads beside the frozen originals.

Each wrapper keeps the original module untouched as `frozen` and runs exactly that module on the
base route, which is what makes the base path bit-identical to the unwrapped network.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from deltapatch.delta.kinds import DeltaConfig, layer_class
from deltapatch.delta.kinds.base import DeltaLayer, FrozenLayer, StackedDelta, row_view
from deltapatch.delta.routing import BASE, MixedBatch, PatchedRows, Router


class TaskRoutedModule(nn.Module, ABC):
    """Common part: the frozen original, one child per task, and the shared router.

    Every wrapper takes the same `add_task` keywords and uses what it needs; `role` names what its
    per-task children are in a patch ("delta", "norm" or "head")."""

    role: ClassVar[str]
    router: Router
    _stack: tuple[int, Any]  # (router version it was built at, build_stack's result)

    def __init__(self, frozen: nn.Module, router: Router) -> None:
        super().__init__()
        self.frozen = frozen
        self.per_task = nn.ModuleDict()
        # Plain attributes (not submodules): the router is shared by all wrappers; the stack is a
        # snapshot of the tasks' tensors for mixed batches, tagged with the router version it was built at.
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "_stack", (-1, None))

    def build_stack(self, modules: list[nn.Module]) -> Any:
        """The tasks' children (in `router.order`) in the stacked form this layer's mixed forward
        uses, or None where it has none (the mixed forward then loops over the batch's tasks)."""
        return None

    def stack_is_current(self) -> bool:
        """Whether the stack was built at the router's current version (no patch changed since)."""
        return self._stack[0] == self.router.version

    def stacked(self) -> Any:
        """`build_stack` for the current tasks, rebuilt once after any change (`Router.version`).
        Plain tensors, outside autograd and inference mode, whatever mode the caller is in."""
        if not self.stack_is_current():
            with torch.inference_mode(False), torch.no_grad():
                stack = self.build_stack([self.per_task[task] for task in self.router.order])
            object.__setattr__(self, "_stack", (self.router.version, stack))
        return self._stack[1]

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

    def build_stack(self, modules: list[nn.Module]) -> list[KindStack]:
        """One KindStack per Δ kind among the tasks (one, unless tasks were trained with different kinds)."""
        kinds: dict[type[nn.Module], list[int]] = {}
        for slot, module in enumerate(modules):
            kinds.setdefault(type(module), []).append(slot)
        stacks = []
        for kind, slots in kinds.items():
            layers = [layer for slot in slots if isinstance(layer := modules[slot], DeltaLayer)]
            assert issubclass(kind, DeltaLayer) and len(layers) == len(slots)  # add_task puts nothing else here
            local = torch.full((len(modules),), -1, dtype=torch.long, device=self.frozen.weight.device)
            local[slots] = torch.arange(len(slots), device=local.device)
            stacks.append(KindStack(kind.stack(layers, self.frozen), frozenset(self.router.order[s] for s in slots),
                                    local, len(slots) == len(modules)))
        return stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        frozen_out = self.frozen(x)
        if router.merged is not None or (router.mixed is None and router.task == BASE):
            return frozen_out  # base route (or Δ already folded into frozen's weights)
        if router.mixed is None:
            return self.per_task[router.task](x, frozen_out, self.frozen)
        # Mixed batch: the base samples keep frozen_out as is (bit-identical), the others are overwritten.
        for kind in self.stacked():
            self._mixed_kind(kind, router.mixed, x, frozen_out)
        return frozen_out

    def _mixed_kind(self, kind: KindStack, batch: MixedBatch, x: torch.Tensor, frozen_out: torch.Tensor) -> None:
        """Patch, in `frozen_out`, the samples whose task's Δ is of `kind`."""
        if kind.stacked is None:  # a kind without a stacked form: its own forward on each task's samples
            for task, index in batch.groups:
                if task in kind.tasks:
                    frozen_out[index] = self.per_task[task](x[index], frozen_out[index], self.frozen).to(frozen_out.dtype)
            return
        patched = batch.patched  # a kind that covers every task: its stack is in slot order
        if not kind.every_task:
            local = kind.local[patched.slots]
            take = local >= 0
            patched = PatchedRows(patched.rows[take], local[take])
        if len(patched.rows):
            kind.stacked.patch(frozen_out, x, patched)


@dataclass(frozen=True)
class KindStack:
    """The tasks of one Δ kind on one layer: their stacked form (None: the kind has none), the
    tasks, each slot's index within the stack (-1: a task of another kind) and whether the kind
    covers every task (no selection needed)."""

    stacked: StackedDelta | None
    tasks: frozenset[str]
    local: torch.Tensor
    every_task: bool


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

    def build_stack(self, modules: list[nn.Module]) -> StackedBatchNorm | None:
        modules = [self.frozen, *modules]
        if not all(StackedBatchNorm.fits(module) for module in modules):
            return None  # LayerNorm/GroupNorm/InstanceNorm, or BN without running statistics: the loop
        return StackedBatchNorm(modules, self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router = self.router
        batch = router.mixed
        if batch is None:
            return self._module(router.task)(x)
        stack = self.stacked()
        if stack is None:
            out = self.frozen(x)
            for task, index in batch.groups:
                if task != BASE:
                    out[index] = self.per_task[task](x[index]).to(out.dtype)
            return out
        # Every sample through its task's affine, then the base samples (usually the few) replaced by
        # the base layer's own output on them: bit-identical, since a norm layer in eval mode computes
        # each sample on its own (tests/delta/test_mixed_batches.py checks it, one base sample included).
        out = stack.forward(x, batch.route)
        if len(batch.base):
            out.index_copy_(0, batch.base, self.frozen(x[batch.base]).to(out.dtype))
        return out


class StackedBatchNorm:
    """The tasks' BatchNorms in eval mode as one per-sample affine: scale = γ/√(σ²+ε) and
    shift = β − μ·scale, stacked (1 + T, C) with the base layer's first (route 0: TaskNorm replaces
    those samples by the base layer's own output) and gathered per sample; timm's BatchNormAct2d then
    applies its own dropout and activation, as its forward does."""

    @staticmethod
    def fits(module: nn.Module) -> bool:
        exact = type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, BatchNormAct2d)
        return exact and isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None

    def __init__(self, modules: list[nn.Module], frozen: nn.Module) -> None:
        scales, shifts = [], []
        for module in modules:
            assert isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None
            assert module.running_mean is not None  # fits() checked the statistics
            scale = torch.rsqrt(module.running_var + module.eps)
            if module.weight is not None:
                scale = scale * module.weight
            shift = -module.running_mean * scale
            scales.append(scale)
            shifts.append(shift if module.bias is None else shift + module.bias)
        self.scale, self.shift = torch.stack(scales), torch.stack(shifts)
        self.after: Callable[[torch.Tensor], torch.Tensor] | None = None
        if isinstance(frozen, BatchNormAct2d):
            drop, act = frozen.drop, frozen.act
            self.after = lambda y: act(drop(y))

    def forward(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(row_view(self.shift[route], x), x, row_view(self.scale[route], x))
        return y if self.after is None else self.after(y)


class TaskHeads(TaskRoutedModule):
    """The classifier: the frozen base head plus one new Linear head per task.

    forward: features (N, F) → logits (N, K). In a mixed batch K is the largest class count among
    the batch's tasks and each row is padded with -inf beyond its own task's K_t.
    """

    role = "head"
    frozen: nn.Linear

    def add_task(self, task: str, *, num_classes: int, config: DeltaConfig) -> None:
        self.per_task[task] = nn.Linear(self.frozen.in_features, num_classes).to(self.frozen.weight.device)

    def build_stack(self, modules: list[nn.Module]) -> StackedHeads:
        return StackedHeads(modules, self.router.order)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        router = self.router
        batch = router.mixed
        if batch is None:
            return self._module(router.task)(features)
        stack: StackedHeads = self.stacked()
        width = max(self.frozen.out_features if task == BASE else stack.classes[task] for task in batch.tasks)
        logits = features.new_full((features.shape[0], width), float("-inf"))
        if len(batch.base):  # on the whole batch, as the base model computes it (a 1-row matmul rounds differently)
            logits[batch.base, : self.frozen.out_features] = self.frozen(features)[batch.base].to(logits.dtype)
        rows = batch.patched.rows
        if len(rows):
            patched = stack.forward(features[rows], batch.patched.slots)[:, :width]
            logits[rows, : patched.shape[1]] = patched.to(logits.dtype)
        return logits


class StackedHeads:
    """The tasks' heads as weights (T, K_max, F) and biases (T, K_max), padded with zero weights
    and a -inf bias beyond each task's K_t: one gathered batched matmul per mixed batch."""

    def __init__(self, modules: list[nn.Module], tasks: tuple[str, ...]) -> None:
        heads = [module for module in modules if isinstance(module, nn.Linear)]
        assert len(heads) == len(modules)  # add_task puts nothing else here
        self.classes = {task: head.out_features for task, head in zip(tasks, heads, strict=True)}
        width = max((head.out_features for head in heads), default=0)
        features = heads[0].in_features if heads else 0
        self.weight = torch.zeros(len(heads), width, features)
        self.bias = torch.full((len(heads), width), float("-inf"))
        if heads:
            self.weight, self.bias = self.weight.to(heads[0].weight), self.bias.to(heads[0].weight)
        for i, head in enumerate(heads):
            self.weight[i, : head.out_features] = head.weight
            self.bias[i, : head.out_features] = 0.0 if head.bias is None else head.bias

    def forward(self, features: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(P, F) features, (P,) slots → (P, K_max) logits, -inf beyond each sample's task's classes."""
        return torch.baddbmm(self.bias[slots].unsqueeze(2), self.weight[slots], features.unsqueeze(2)).squeeze(2)


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

    def build_stack(self, modules: list[nn.Module]) -> torch.Tensor:
        """(1 + T, *shape): the frozen tensor first (route 0), then each task's copy."""
        values: list[torch.Tensor] = [self.frozen.value]
        values += [module.value for module in modules if isinstance(module, LooseParameter)]
        return torch.stack(values)

    def value(self) -> torch.Tensor:
        router = self.router
        if router.mixed is None:
            return self.scale(router.task)
        return self.stacked()[router.mixed.route]


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
