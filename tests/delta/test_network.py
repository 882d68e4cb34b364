"""DeltaNetwork: base bit-identity, zero init, routing, mixed batches, merge/unmerge, counting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.errors import DeltapatchError
from tests.delta.conftest import perturb

KINDS = [("channel", {}), ("lowrank", {"rank": 4})]


def _net_with_tasks(model: nn.Module) -> DeltaNetwork:
    net = DeltaNetwork(model)
    net.add_task("alpha", 10, make_config("channel"))
    net.add_task("beta", 5, make_config("lowrank", {"rank": 4}))
    for task in net.tasks:
        perturb(net.task_parameters(task))
    return net


@torch.no_grad()
def test_base_route_is_bit_identical_with_patches_loaded(base_and_reference, images):
    model, reference = base_and_reference
    expected = reference(images)
    net = _net_with_tasks(model)
    assert torch.equal(net.select("base")(images), expected)
    net.select("alpha")(images)
    assert torch.equal(net.select("base")(images), expected)


def test_base_route_is_bit_identical_after_training_a_patch(base_and_reference, images):
    model, reference = base_and_reference
    net = _net_with_tasks(model)
    net.select("alpha").train()
    optimizer = torch.optim.SGD(net.task_parameters("alpha"), lr=0.5)
    for _ in range(3):  # train mode: the task's own BatchNorms update their statistics
        optimizer.zero_grad()
        net(images).logsumexp(1).mean().backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net.select("base")(images), reference(images))
        state = {k: v for k, v in reference.state_dict().items()}
        for key, value in net.model.state_dict().items():
            if ".frozen." in key or key.endswith(".frozen"):
                original = key.replace(".frozen", "")
                assert torch.equal(value, state[original]), key


@pytest.mark.parametrize(("kind", "options"), KINDS)
@torch.no_grad()
def test_fresh_patch_starts_at_the_base_function(base_and_reference, images, kind, options):
    model, reference = base_and_reference
    net = DeltaNetwork(model)
    net.add_task("fresh", 10, make_config(kind, options))
    heads = net.model.fc
    heads.per_task["fresh"].load_state_dict(heads.frozen.state_dict())  # same head → same function
    # Exact, not close: each Δ adds an exact zero to frozen(x) (channel: 0 + frozen(x)·1; lowrank: B = 0,
    # so B(A(x)) is all zeros), and the task's BatchNorms are copies of the base's, in eval mode.
    assert torch.equal(net.select("fresh")(images), reference(images))


@torch.no_grad()
def test_patch_changes_the_task_output(base_and_reference, images):
    model, reference = base_and_reference
    net = _net_with_tasks(model)
    assert net.select("alpha")(images).shape == (12, 10)
    assert net.select("beta")(images).shape == (12, 5)
    assert not torch.allclose(net.select("alpha")(images), reference(images))


@torch.no_grad()
def test_mixed_batch_equals_per_task_runs(base_and_reference, images):
    model, _ = base_and_reference
    net = _net_with_tasks(model)
    tasks = ["alpha", "base", "beta", "beta", "alpha", "base", "alpha", "beta", "base", "alpha", "beta", "base"]
    mixed = net(images, tasks=tasks)
    assert mixed.shape == (12, 10)
    for task in ("alpha", "beta", "base"):
        rows = [i for i, t in enumerate(tasks) if t == task]
        separate = net.select(task)(images[rows])
        width = separate.shape[1]
        torch.testing.assert_close(mixed[rows, :width], separate, rtol=1e-5, atol=1e-5)
        assert torch.isneginf(mixed[rows, width:]).all()


@pytest.mark.parametrize(("kind", "options"), KINDS)
@torch.no_grad()
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(base_and_reference, images, kind, options):
    model, reference = base_and_reference
    net = DeltaNetwork(model)
    net.add_task("gamma", 7, make_config(kind, options))
    perturb(net.task_parameters("gamma"))
    unmerged = net.select("gamma")(images)
    pristine = {k: v.clone() for k, v in reference.state_dict().items()}
    net.merge("gamma")
    torch.testing.assert_close(net(images), unmerged, rtol=1e-4, atol=1e-4)
    with pytest.raises(DeltapatchError, match="merged"):
        net.select("base")
    net.unmerge()
    assert torch.equal(net.select("base")(images), reference(images))
    for key, value in net.model.state_dict().items():
        if ".frozen." in key:
            assert torch.equal(value, pristine[key.replace(".frozen", "")]), key


def test_parameter_counts(base_and_reference):
    model, reference = base_and_reference
    total = sum(p.numel() for p in reference.parameters())
    net = DeltaNetwork(model)
    net.add_task("chan", 3, make_config("channel"))
    net.add_task("low", 3, make_config("lowrank", {"rank": 2}))
    convs = [m for m in reference.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_params = sum(2 * m.num_features for m in bns)
    head = 512 * 3 + 3
    assert net.parameter_counts("chan") == (sum(2 * c.out_channels for c in convs) + bn_params + head, total)
    lowrank = sum(2 * (c.out_channels + c.weight[0].numel()) for c in convs)
    assert net.parameter_counts("low") == (lowrank + bn_params + head, total)
    assert all(not p.requires_grad for _, w in net._wrappers() for p in w.frozen.parameters())


def test_routing_errors_are_clear(base_and_reference):
    model, _ = base_and_reference
    net = DeltaNetwork(model)
    with pytest.raises(DeltapatchError, match="no patch loaded for task 'nope'"):
        net.select("nope")
    with pytest.raises(DeltapatchError, match="reserved"):
        net.add_task("base", 2, make_config("channel"))
    with pytest.raises(DeltapatchError, match="invalid task name"):
        net.add_task("Bad Name", 2, make_config("channel"))
    with pytest.raises(ValueError, match="unknown Δ kind"):
        make_config("nope")


@torch.no_grad()
def test_other_architectures_wrap_and_stay_identical(images):
    from tests.delta.conftest import random_base

    for arch in ("mobilenet_v3_small", "vgg11_bn"):
        model = random_base(arch, num_classes=4)
        import copy

        reference = copy.deepcopy(model)
        x = torch.randn(2, 3, 64, 64) if arch == "mobilenet_v3_small" else torch.randn(2, 3, 32, 32)
        net = DeltaNetwork(model)
        net.add_task("t", 3, make_config("lowrank", {"rank": 2}))
        perturb(net.task_parameters("t"))
        assert torch.equal(net.select("base")(x), reference(x))
        unmerged = net.select("t")(x)
        net.merge("t")
        torch.testing.assert_close(net(x), unmerged, rtol=1e-3, atol=1e-3)
        net.unmerge()
        assert torch.equal(net.select("base")(x), reference(x))
