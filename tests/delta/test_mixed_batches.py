"""Mixed-task batches: every route equals its own forward, the base rows stay bit-identical, each
layer runs a fixed number of kernels whatever the number of tasks, and the stacks follow changes."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from deltapatch.delta import DeltaNetwork, make_config
from tests.delta.conftest import perturb, random_base

LOWRANK = ("lowrank", {"rank": 4})
CHANNEL = ("channel", {})


def _net(model: nn.Module, specs: list[tuple[str, dict]], classes: tuple[int, ...] = (10, 5, 7)) -> DeltaNetwork:
    """A network with one perturbed task per spec (`t0`, `t1`, …), heads of varying widths."""
    net = DeltaNetwork(model)
    for i, (kind, options) in enumerate(specs):
        net.add_task(f"t{i}", classes[i % len(classes)], make_config(kind, options))
        perturb(net.task_parameters(f"t{i}"), seed=10 + i)
    return net.eval()


def _assert_routes_match(net: DeltaNetwork, reference: nn.Module, x: torch.Tensor, tasks: list[str]) -> None:
    """Each patched route's rows allclose (rtol 1e-4) to that route's own forward; the base rows
    torch.equal to the untouched base model on the same batch (MobileNetV3's own bits depend on the
    batch it runs in, so the same batch, not the base rows alone); -inf beyond a task's classes."""
    with torch.no_grad():
        mixed = net(x, tasks=tasks)
        base_model = reference(x)
        for task in dict.fromkeys(tasks):
            rows = [i for i, t in enumerate(tasks) if t == task]
            alone = base_model[rows] if task == "base" else net.select(task)(x[rows])
            width = alone.shape[1]
            if task == "base":
                assert torch.equal(mixed[rows, :width], alone), "base rows changed"
            else:
                torch.testing.assert_close(mixed[rows, :width], alone, rtol=1e-4, atol=1e-5)
            assert torch.isneginf(mixed[rows, width:]).all()
        net.select("base")


@pytest.mark.parametrize("specs", [
    [LOWRANK, LOWRANK, LOWRANK],
    [CHANNEL, CHANNEL],
    [LOWRANK, CHANNEL, LOWRANK],  # two kinds on every layer: one stack per kind
    [("lowrank", {"rank": 1}), ("lowrank", {"rank": 6}), ("lowrank", {"budget_pct": 3, "allocation": "proportional"})],
], ids=["lowrank", "channel", "two-kinds", "ranks-differ"])
def test_every_route_of_a_mixed_batch_equals_its_own_forward(base_and_reference, images, specs):
    model, reference = base_and_reference
    net = _net(model, specs)
    names = ["base", *net.tasks]
    tasks = [names[(7 * i) % len(names)] for i in range(len(images))]
    _assert_routes_match(net, reference, images, tasks)


def test_a_batch_without_base_rows_and_one_of_base_rows_only(base_and_reference, images):
    model, reference = base_and_reference
    net = _net(model, [LOWRANK, CHANNEL])
    _assert_routes_match(net, reference, images, ["t0", "t1"] * 6)
    _assert_routes_match(net, reference, images, ["base"] * 11 + ["t1"])


def test_a_skewed_batch_takes_the_per_sample_form_and_still_matches(base_and_reference, images):
    """One task with most of the batch: the by-task grid would mostly repeat samples (Segments)."""
    model, reference = base_and_reference
    net = _net(model, [LOWRANK, LOWRANK, LOWRANK])
    tasks = ["t0"] * 9 + ["t1", "t2", "base"]
    assert net.router.order == ("t0", "t1", "t2")
    from deltapatch.delta.routing import MixedBatch
    batch = MixedBatch.build(tasks, net.router.order, images.device)
    assert batch.patched.segments is None
    even = MixedBatch.build(["t0", "t1", "t2", "base"] * 3, net.router.order, images.device)
    assert even.patched.segments is not None and even.patched.segments.cells == 9
    _assert_routes_match(net, reference, images, tasks)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "convnext_tiny", "timm:tf_efficientnet_lite0"])
def test_other_architectures_mix_routes_exactly(arch):
    """Depthwise convolutions (weight-space Δ), LayerNorm (the per-task loop) and ConvNeXt's
    layer_scale, timm's TF-'same' padding and BatchNormAct2d."""
    if arch.startswith("timm:"):
        torch.manual_seed(0)
        model = timm.create_model(arch.removeprefix("timm:"), pretrained=False, num_classes=4).eval()
    else:
        model = random_base(arch, num_classes=4)
    reference = copy.deepcopy(model)
    net = _net(model, [("lowrank", {"rank": 2}), ("lowrank", {"rank": 3}), CHANNEL], classes=(3, 6))
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    _assert_routes_match(net, reference, x, ["t0", "base", "t1", "t2", "t0", "base"])


def _aten_calls(net: DeltaNetwork, x: torch.Tensor, tasks: list[str]) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        net(x, tasks=tasks)
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def test_a_mixed_batch_costs_the_same_kernels_for_2_and_for_12_tasks(images):
    """The stacked forward gathers each sample's task instead of looping over the batch's tasks."""
    counts = []
    for n_tasks in (2, 12):
        net = _net(random_base(), [LOWRANK] * n_tasks)
        tasks = [f"t{i % n_tasks}" for i in range(len(images))]
        tasks[0] = "base"
        net(images, tasks=tasks)  # builds the stacks (once per change, not per batch)
        counts.append(_aten_calls(net, images, tasks))
    assert counts[0] == counts[1], counts


def test_the_stacks_follow_every_change_of_the_served_set(base_and_reference, images):
    model, reference = base_and_reference
    net = _net(model, [LOWRANK, CHANNEL])
    tasks = ["t0", "base", "t1", "t0"] * 3
    _assert_routes_match(net, reference, images, tasks)
    # New tensors loaded into a task (a hot reload of another version)
    state = {k: v + 0.05 for k, v in net.task_state_dict("t0").items()}
    net.load_task_state_dict("t0", state)
    _assert_routes_match(net, reference, images, tasks)
    # A task added, another removed (the order of the stacks' slots changes)
    net.add_task("t2", 3, make_config(*LOWRANK))
    perturb(net.task_parameters("t2"), seed=42)
    net.patches_changed()  # perturb edits the tensors by hand, in eval mode
    _assert_routes_match(net, reference, images, ["t2", "t1", "base", "t0"] * 3)
    net.remove_task("t0")
    _assert_routes_match(net, reference, images, ["t2", "t1", "base"] * 4)
    # A few training steps on one task (train() marks the stacks stale)
    net.select("t1").train()
    optimizer = torch.optim.SGD(net.task_parameters("t1"), lr=0.1)
    net(images).logsumexp(1).mean().backward()
    optimizer.step()
    net.eval()
    _assert_routes_match(net, reference, images, ["t2", "t1", "base"] * 4)


def test_mixed_batches_run_under_inference_mode_and_then_with_autograd(base_and_reference, images):
    """The stacks are plain tensors whichever mode first built them."""
    model, reference = base_and_reference
    net = _net(model, [LOWRANK])
    tasks = ["t0", "base"] * 6
    with torch.inference_mode():
        expected = net(images, tasks=tasks)
    x = images.clone().requires_grad_(True)
    out = net(x, tasks=tasks)
    out[:, :5].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.detach(), expected)
