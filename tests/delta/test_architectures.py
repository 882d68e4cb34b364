"""Every architecture family of docs/benchmark.md's "Other architectures" table, random-init, built for
32×32 inputs and fed 16×16 ones (4× less compute; the same layers run):
wrap, budget respected, bit-identical base, one training step moves the task route and not the base
route, merge/unmerge exact. Plus the norm-layer kinds (LayerNorm, GroupNorm) on a tiny custom CNN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.layers import DeltaWrapped, TaskHeads, TaskNorm, TaskScale, is_task_norm
from deltapatch.models.base import BaseSettings, build_architecture
from tests.delta.conftest import perturb

FAMILIES = ["resnet18", "mobilenet_v3_small", "convnext_tiny"]


def _random_base(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_architecture(BaseSettings(arch=arch), num_classes=10)
    with torch.no_grad():  # non-trivial norm layers and a visible layer scale, so a mix-up would show
        for module in model.modules():
            if is_task_norm(module):
                for param in module.parameters():
                    param.uniform_(0.5, 1.5)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
        for name, param in model.named_parameters():
            if name.endswith("layer_scale"):
                param.fill_(0.5)
    return model.eval()


def _frozen_state(net: DeltaNetwork) -> dict[str, torch.Tensor]:
    # ".frozen.value": a loose parameter (ConvNeXt's layer_scale) held by its TaskScale
    return {k.replace(".frozen.value", "").replace(".frozen", ""): v.clone()
            for k, v in net.model.state_dict().items() if ".per_task." not in k}


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_wraps_within_budget_and_keeps_the_base_exact(arch):
    model = _random_base(arch)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    convs_linears = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in reference.modules())
    norms = sum(is_task_norm(m) for m in reference.modules())
    net = DeltaNetwork(model)
    wrappers = [w for _, w in net._wrappers()]
    assert sum(isinstance(w, DeltaWrapped) for w in wrappers) == convs_linears - 1  # all but the head
    assert sum(isinstance(w, TaskHeads) for w in wrappers) == 1
    assert sum(isinstance(w, TaskNorm) for w in wrappers) == norms > 0

    # Budget: the default (3 %, uniform ranks) holds Δs + norm layers (with statistics) + head.
    net.add_task("t", 5, make_config("lowrank", {"budget_pct": 3.0}))
    trainable, total = net.parameter_counts("t")
    stored = sum(t.numel() for t in net.task_state_dict("t").values())
    assert total == sum(p.numel() for p in reference.parameters())
    assert 1.0 < 100 * trainable / total <= 100 * stored / total <= 3.0
    for w in wrappers:  # a task's BatchNorm statistics follow the task (MobileNetV3's base uses 0.01)
        if isinstance(w, TaskNorm) and isinstance(w.frozen, nn.BatchNorm2d):
            assert w.per_task["t"].momentum >= 0.1 and w.frozen.momentum == (0.01 if "mobilenet_v3" in arch else 0.1)

    with torch.no_grad():
        assert torch.equal(net.select("base")(x), expected)
        before = net.select("t")(x)

    # One training step on the task route: the task output moves, the base route does not.
    net.select("t").train()
    optimizer = torch.optim.SGD(net.task_parameters("t"), lr=0.05)  # 0.5: resnet18 overflowed to inf
    loss = nn.functional.cross_entropy(net(x), torch.tensor([0, 3]))
    loss.backward()
    optimizer.step()
    net.eval()
    with torch.no_grad():
        assert not torch.allclose(net.select("t")(x), before, atol=1e-4)
        assert torch.equal(net.select("base")(x), expected)
    pristine = reference.state_dict()
    for key, value in _frozen_state(net).items():
        assert torch.equal(value, pristine[key]), key

    # Merge folds the Δs into the weights (same function); unmerge restores the exact base.
    perturb(net.task_parameters("t"), scale=0.01)
    with torch.no_grad():
        unmerged = net.select("t")(x)
        net.merge("t")
        torch.testing.assert_close(net(x), unmerged, rtol=1e-3, atol=1e-3)
        net.unmerge()
        assert torch.equal(net.select("base")(x), expected)
    for key, value in _frozen_state(net).items():
        assert torch.equal(value, pristine[key]), key


class _NormZoo(nn.Module):
    """conv → GroupNorm → conv → channels-last LayerNorm → Linear MLP (ConvNeXt-style) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)
        self.plain = nn.GroupNorm(1, 8, affine=False)  # nothing a task could own: stays shared
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(torch.relu(self.gn(self.conv1(x))))
        x = self.mlp(self.ln(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.fc(self.plain(x).mean((2, 3)))


@pytest.mark.parametrize(("kind", "options"), [("channel", {}), ("lowrank", {"rank": 2})])
def test_layernorm_and_groupnorm_get_per_task_affine_and_the_base_stays_exact(kind, options):
    torch.manual_seed(0)
    model = _NormZoo().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8)
    net = DeltaNetwork(model)
    assert isinstance(net.model.gn, TaskNorm) and isinstance(net.model.ln, TaskNorm)
    assert not isinstance(net.model.plain, TaskNorm)  # affine-free norm: shared, nothing to own
    net.add_task("a", 3, make_config(kind, {"budget_pct": None, **options}))
    own = net.model.ln.per_task["a"]
    assert own.weight.requires_grad and own.weight is not net.model.ln.frozen.weight
    net.select("a").train()
    optimizer = torch.optim.SGD(net.task_parameters("a"), lr=0.5)
    net(x).logsumexp(1).mean().backward()
    optimizer.step()
    net.eval()
    assert not torch.equal(own.weight, net.model.ln.frozen.weight)  # the task's affine moved
    with torch.no_grad():
        assert torch.equal(net.select("base")(x), reference(x))
        mixed = net(x, tasks=["a", "base", "a", "base", "a", "base"])
        torch.testing.assert_close(mixed[1::2, :4], reference(x[1::2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[0::2, :3], net.select("a")(x[0::2]), rtol=1e-5, atol=1e-5)


def test_convnext_layer_scale_is_a_per_task_copy_and_the_base_keeps_its_own():
    """Each task owns every block's layer_scale (trained with the norm group, stored in the patch);
    turning one task's up moves only that task's route, in single and mixed batches."""
    model = _random_base("convnext_tiny")
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    net = DeltaNetwork(model)
    for task in ("a", "b"):
        net.add_task(task, 5, make_config("lowrank", {"budget_pct": 3.0}))
    scales = {name: w for name, w in net._wrappers() if isinstance(w, TaskScale)}
    blocks = [m for m in reference.modules() if hasattr(m, "layer_scale")]
    assert len(scales) == len(blocks) == 18
    own = {p for w in scales.values() for p in w.per_task["a"].parameters()}
    assert own <= set(net.task_parameter_groups("a")["norm"]) and all(p.requires_grad for p in own)
    assert all(not w.frozen.value.requires_grad for w in scales.values())
    assert sum(k.endswith("layer_scale.value") for k in net.task_state_dict("a")) == 18
    with torch.no_grad():
        expected, b_before = reference(x), net.select("b")(x)
        a_before = net.select("a")(x)
        for w in scales.values():
            w.per_task["a"].value.mul_(4.0)
        a_after = net.select("a")(x)
        assert not torch.allclose(a_after, a_before, atol=1e-4)
        assert torch.equal(net.select("base")(x), expected)
        assert torch.equal(net.select("b")(x), b_before)
        mixed = net(x, tasks=["a", "base", "b", "a"])
        torch.testing.assert_close(mixed[[0, 3], :5], a_after[[0, 3]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[[2], :5], b_before[[2]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[[1]], expected[[1]], rtol=1e-5, atol=1e-5)
    state = net.task_state_dict("a")
    net.remove_task("a")
    net.add_task("a", 5, make_config("lowrank", {"budget_pct": 3.0}))
    net.load_task_state_dict("a", state)
    with torch.no_grad():
        torch.testing.assert_close(net.select("a")(x), a_after, rtol=0, atol=0)
