"""DeltaNetwork: a frozen CNN with per-task Δ-patches, task routing, merge and mixed batches.

    net = DeltaNetwork(base_model)              # wraps in place; base weights frozen
    net.add_task("glyphs", num_classes=10, config=LowRankConfig(rank=8))  # budget_pct=3: ranks sized to a 3 % budget
    net.select("glyphs")(x)                     # base + the glyphs patch
    net.select("base")(x)                       # bit-identical to base_model(x)
    net(x, tasks=["base", "glyphs", ...])       # mixed batch, one forward
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from deltapatch.delta.budget import TENSOR_OVERHEAD, BudgetError, LayerShape, PatchLayout
from deltapatch.delta.kinds import DeltaConfig
from deltapatch.delta.layers import (
    DeltaWrapped,
    TaskHeads,
    TaskNorm,
    TaskRoutedModule,
    TaskScale,
    is_channel_vector,
    is_task_norm,
    route_loose_parameter,
)
from deltapatch.delta.routing import BASE, MixedBatch, Router
from deltapatch.errors import DeltapatchError
from deltapatch.fingerprint import fingerprint
from deltapatch.task_names import validate_task_name


def final_linear_name(model: nn.Module) -> str:
    """Dotted name of the classifier: the last nn.Linear registered in the model."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise DeltapatchError("the base model has no nn.Linear classifier; deltapatch needs one")
    return names[-1]


class DeltaNetwork(nn.Module):
    """Wraps `base_model` in place. Its parameters are frozen and never modified (except while a
    task is merged, and `unmerge` restores the very same tensors)."""

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_fingerprint = fingerprint(base_model.state_dict())
        # Counted before wrapping: every base parameter, also those outside any wrapped layer
        # (e.g. ConvNeXt's layer_scale), is what a patch's budget is a percentage of.
        self.base_params = sum(p.numel() for p in base_model.parameters())
        for param in base_model.parameters():
            param.requires_grad_(False)
        self.router = Router()
        self.task_configs: dict[str, DeltaConfig] = {}
        self.head_name = final_linear_name(base_model)
        self.model = base_model
        self._wrap(base_model)
        self._pristine: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.train(False)

    # ---------------------------------------------------------------- construction
    def _wrap(self, base_model: nn.Module) -> None:
        for name, module in list(base_model.named_modules()):
            if name == self.head_name:
                wrapper: nn.Module = TaskHeads(module, self.router)
            elif isinstance(module, nn.Conv2d | nn.Linear):
                wrapper = DeltaWrapped(module, self.router)
            elif is_task_norm(module):
                wrapper = TaskNorm(module, self.router)
            else:  # any other module: its own per-channel parameters (ConvNeXt's layer_scale) are routed
                loose = [key for key, param in module._parameters.items() if param is not None and is_channel_vector(param)]
                for key in loose:
                    route_loose_parameter(module, key, self.router)
                continue
            parent_name, _, child = name.rpartition(".")
            setattr(base_model.get_submodule(parent_name) if parent_name else base_model, child, wrapper)

    def _wrappers(self) -> Iterator[tuple[str, TaskRoutedModule]]:
        for name, module in self.model.named_modules():
            if isinstance(module, TaskRoutedModule):
                yield name, module

    @property
    def tasks(self) -> list[str]:
        return list(self.task_configs)

    def patch_layout(self, num_classes: int) -> PatchLayout:
        """The shapes and fixed costs of one patch with a `num_classes` head (for the budget)."""
        layers, norm_state, head_params, fixed_tensors = [], 0, 0, 2  # the head's weight and bias
        for name, wrapper in self._wrappers():
            if isinstance(wrapper, DeltaWrapped):
                weight = wrapper.frozen.weight
                layers.append(LayerShape(name, int(weight.shape[0]), int(weight[0].numel())))
            elif isinstance(wrapper, TaskNorm | TaskScale):
                state = wrapper.frozen.state_dict()
                norm_state += sum(t.numel() for t in state.values())
                fixed_tensors += len(state)
            elif isinstance(wrapper, TaskHeads):
                head_params = (wrapper.frozen.in_features + 1) * num_classes
        return PatchLayout(tuple(layers), norm_state, head_params, self.base_params, fixed_tensors)

    def add_task(self, task: str, num_classes: int, config: DeltaConfig) -> None:
        """Create a fresh, zero-initialised patch: with it selected the network equals the base
        (apart from the new head). `config` is first resolved for this network (with a budget:
        per-layer ranks under it); the resolved config is `task_configs[task]`. With
        `config.budget_pct` set, a patch that stores more values (Δs, norm parameters and
        statistics, head, file overhead) than that share of the base's parameters is refused."""
        validate_task_name(task)
        if task in self.task_configs:
            raise DeltapatchError(f"task '{task}' is already loaded; remove_task('{task}') first")
        config = config.resolve(self.patch_layout(num_classes))
        device = next(self.model.parameters()).device
        for name, wrapper in self._wrappers():
            # Each Δ layer gets its own resolved config (e.g. its rank); norm layers and heads ignore it.
            layer_config = config.layer_config(name) if isinstance(wrapper, DeltaWrapped) else config
            wrapper.add_task(task, num_classes=num_classes, config=layer_config)
            wrapper.per_task[task].to(device)
        self.task_configs[task] = config
        self.patches_changed()
        state = self.task_state_dict(task)
        stored = sum(t.numel() for t in state.values()) + TENSOR_OVERHEAD * len(state)
        if config.budget_pct is not None and stored > config.budget_pct / 100.0 * self.base_params:
            self.remove_task(task)
            raise BudgetError(
                f"a {config.kind} patch for '{task}' stores {stored} values (Δs, norm layers, head, file overhead), "
                f"{100.0 * stored / self.base_params:.2f} % of the base's parameters, above delta.budget_pct "
                f"{config.budget_pct:g}; raise delta.budget_pct or pick a smaller Δ"
            )

    def remove_task(self, task: str) -> None:
        if self.router.merged == task:
            self.unmerge()
        for _, wrapper in self._wrappers():
            wrapper.remove_task(task)
        self.task_configs.pop(task, None)
        self.patches_changed()
        if self.router.task == task:
            self.router.task = BASE

    def patches_changed(self) -> None:
        """Tell the layers that a patch's tensors may have changed: their stacks for mixed batches
        are rebuilt before the next one. Called by everything here that changes a patch (add, remove,
        load, train(), merge, moving devices); code that edits a patch's tensors in place by hand in
        eval mode calls it too."""
        self.router.order = tuple(self.task_configs)
        self.router.version += 1

    def prepare_mixed(self) -> bool:
        """Build every layer's stacks now (else the next mixed batch does): a server calls it while
        it holds the lock under which it changed the served set, so no request pays for the build.
        Returns whether any stack was stale (rebuilt)."""
        stale = [wrapper for _, wrapper in self._wrappers() if not wrapper.stack_is_current()]
        for wrapper in stale:
            wrapper.stacked()
        return bool(stale)

    # ---------------------------------------------------------------- routing
    def _check_task(self, task: str) -> None:
        if task != BASE and task not in self.task_configs:
            raise DeltapatchError(f"no patch loaded for task '{task}'; loaded: {['base', *self.tasks]}")
        if self.router.merged is not None and task != self.router.merged:
            raise DeltapatchError(
                f"task '{self.router.merged}' is merged into the weights; call unmerge() before routing to '{task}'"
            )

    def select(self, task: str) -> DeltaNetwork:
        """Route every following forward to `task` ('base' = the untouched original)."""
        self._check_task(task)
        self.router.task = task
        self.router.mixed = None
        self.train(self.training)  # re-apply BN train/eval for the new active task
        return self

    @property
    def active_task(self) -> str:
        return self.router.task

    def forward(self, x: torch.Tensor, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """x: (N, 3, H, W) → logits (N, K).

        With `tasks` (one name per sample) the batch is mixed: each sample goes through its own
        task's patch in one forward; rows are padded with -inf beyond their task's class count.
        Each layer runs a fixed number of kernels whatever the number of tasks (each sample gathers
        its task's rows of the layer's stacked tensors); the base samples' rows are bit-identical to
        the base model's.
        """
        if tasks is None:
            return self.model(x)
        if len(tasks) != x.shape[0]:
            raise DeltapatchError(f"got {len(tasks)} task names for a batch of {x.shape[0]} samples")
        names = list(dict.fromkeys(tasks))
        for task in names:
            self._check_task(task)
        if len(names) == 1:
            previous = self.router.task
            try:
                self.router.task = names[0]
                return self.model(x)
            finally:
                self.router.task = previous
        if self.training:
            raise DeltapatchError("mixed-task batches are for inference; call .eval() first")
        self.router.mixed = MixedBatch.build(list(tasks), self.router.order, x.device)
        try:
            return self.model(x)
        finally:
            self.router.mixed = None

    def train(self, mode: bool = True) -> DeltaNetwork:
        """Only the active task's BatchNorms ever train: base statistics stay pristine."""
        super().train(mode)
        if mode:
            self.patches_changed()  # training moves the active task's tensors
        for _, wrapper in self._wrappers():
            wrapper.frozen.eval()
            if isinstance(wrapper, TaskNorm):
                for task, module in wrapper.per_task.items():
                    module.train(mode and task == self.router.task)
        return self

    # ---------------------------------------------------------------- parameters
    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The trainable parameters of one task's patch (Δs, norm-layer affine, head)."""
        self._check_task(task)
        return [p for _, w in self._wrappers() if task in w.per_task for p in w.per_task[task].parameters()]

    def task_parameter_groups(self, task: str) -> dict[str, list[nn.Parameter]]:
        """`task`'s trainable parameters by role: "delta" (the Δs), "norm" (its BatchNorms), "head"."""
        self._check_task(task)
        groups: dict[str, list[nn.Parameter]] = {"delta": [], "norm": [], "head": []}
        for _, wrapper in self._wrappers():
            if task in wrapper.per_task:
                groups[wrapper.role].extend(wrapper.per_task[task].parameters())
        return groups

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """Everything a patch holds, keyed '<layer path>.<tensor>' (buffers included)."""
        self._check_task(task)
        state: dict[str, torch.Tensor] = {}
        for name, wrapper in self._wrappers():
            if task in wrapper.per_task:
                for key, value in wrapper.per_task[task].state_dict().items():
                    state[f"{name}.{key}"] = value
        return state

    def load_task_state_dict(self, task: str, state: dict[str, torch.Tensor]) -> None:
        """Inverse of task_state_dict; any missing, extra or mis-shaped tensor is an error."""
        expected = self.task_state_dict(task)
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise DeltapatchError(
                f"patch tensors do not fit this base model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, value in state.items():
            if expected[key].shape != value.shape:
                raise DeltapatchError(
                    f"patch tensor '{key}' has shape {tuple(value.shape)}, base expects {tuple(expected[key].shape)}"
                )
            expected[key].copy_(value)
        self.patches_changed()

    def parameter_counts(self, task: str) -> tuple[int, int]:
        """(trainable parameters of `task`'s patch, parameters of the base model)."""
        return sum(p.numel() for p in self.task_parameters(task)), self.base_params

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, task: str) -> DeltaNetwork:
        """Fold `task`'s Δs into the frozen conv/linear weights: serving it then costs exactly a
        plain forward. The pristine Parameter objects are kept aside, not recomputed."""
        self._check_task(task)
        if task == BASE:
            raise DeltapatchError("the base task has nothing to merge")
        for name, wrapper in self._wrappers():
            if isinstance(wrapper, DeltaWrapped):
                frozen = wrapper.frozen
                self._pristine[name] = (frozen.weight, frozen.bias)
                weight, bias = wrapper.delta(task).merged_weight(frozen)
                frozen.weight = nn.Parameter(weight, requires_grad=False)
                frozen.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.router.merged = task
        self.patches_changed()
        return self.select(task)

    @torch.no_grad()
    def unmerge(self) -> DeltaNetwork:
        """Put the original weight tensors back: the base is bit-exact again."""
        modules = dict(self._wrappers())
        for name, (weight, bias) in self._pristine.items():
            wrapper = modules[name]
            assert isinstance(wrapper, DeltaWrapped)  # merge() recorded only these
            frozen = wrapper.frozen
            frozen.weight = weight
            frozen.bias = bias
        self._pristine.clear()
        self.router.merged = None
        self.patches_changed()
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DeltaNetwork:
        """.to(), .cuda(), .half(): the stacks follow on the next mixed batch."""
        result = super()._apply(fn, recurse)
        self.patches_changed()
        return result
