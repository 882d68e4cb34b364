"""The parameter budget: rank allocation (pure), its use by DeltaNetwork, explicit ranks under it, and no budget."""

from __future__ import annotations

import pytest
import torch

from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.budget import TENSOR_OVERHEAD, BudgetError, LayerShape, PatchLayout, allocate_ranks
from deltapatch.delta.kinds.lowrank import DEFAULT_RANK
from deltapatch.errors import DeltapatchError
from deltapatch.patching import budget_note
from tests.delta.conftest import random_base

# A thin stem, two mid layers and a fat last layer, like a CNN's.
LAYERS = (
    LayerShape("stem", 16, 27),
    LayerShape("mid1", 64, 576),
    LayerShape("mid2", 128, 1152),
    LayerShape("last", 512, 4608),
)


def _cost(ranks: dict[str, int]) -> int:
    return sum(layer.lowrank_params(ranks[layer.name]) for layer in LAYERS)


@pytest.mark.parametrize("allocation", ["proportional", "uniform"])
@pytest.mark.parametrize("budget", [3_000, 8_000, 30_000, 120_000])
def test_ranks_fit_the_budget_and_use_most_of_it(allocation, budget):
    ranks = allocate_ranks(LAYERS, budget, allocation)
    assert set(ranks) == {layer.name for layer in LAYERS}
    assert all(0 <= ranks[layer.name] <= layer.max_rank for layer in LAYERS)
    assert min(ranks.values()) >= (1 if budget >= _cost(dict.fromkeys(ranks, 1)) else 0)
    assert _cost(ranks) <= budget
    # Less than one more rank on every layer is left unspent.
    assert budget - _cost(ranks) < sum(layer.lowrank_params(1) for layer in LAYERS)


def test_proportional_gives_each_layer_the_same_fraction_and_uniform_the_same_rank():
    proportional = allocate_ranks(LAYERS[1:], 100_000, "proportional")
    fractions = [layer.lowrank_params(proportional[layer.name]) / layer.size for layer in LAYERS[1:]]
    assert max(fractions) - min(fractions) < 0.02, fractions
    assert proportional["last"] > proportional["mid2"] > proportional["mid1"]
    uniform = allocate_ranks(LAYERS, 100_000, "uniform")
    assert max(uniform.values()) - min(uniform.values()) <= 1


def test_weights_tilt_the_allocation_and_ranks_stop_at_full_rank():
    even = allocate_ranks(LAYERS, 60_000, "uniform")
    tilted = allocate_ranks(LAYERS, 60_000, "uniform", weights={"stem": 1, "mid1": 4, "mid2": 1, "last": 1})
    assert tilted["mid1"] > even["mid1"] and tilted["last"] < even["last"]
    assert allocate_ranks(LAYERS, 10_000_000, "uniform")["stem"] == 16  # full rank of a 16×27 layer


def test_a_tight_budget_leaves_the_smallest_layers_without_a_delta():
    ranks = allocate_ranks(LAYERS, 6_000)  # less than rank 1 everywhere (7083)
    assert _cost(ranks) <= 6_000 and ranks["last"] == 1 and ranks["mid2"] == 0
    assert allocate_ranks(LAYERS, 7_083) == {"stem": 1, "mid1": 1, "mid2": 1, "last": 1}


def test_a_budget_below_the_fixed_cost_is_refused_clearly():
    layout = PatchLayout(LAYERS, norm_state=1_000, head_params=5_000, base_params=3_000_000, fixed_tensors=12)
    assert layout.delta_budget(3.0) == 90_000 - 6_000 - TENSOR_OVERHEAD * (12 + 2 * len(LAYERS))
    with pytest.raises(BudgetError, match=r"raise delta.budget_pct") as error:
        layout.delta_budget(0.1)
    assert str(layout.fixed_params) in str(error.value)  # the fixed cost of head + norm layers is named
    with pytest.raises(ValueError, match="unknown rank allocation"):
        allocate_ranks(LAYERS, 10_000, "random")


@pytest.mark.parametrize("allocation", ["proportional", "uniform"])
def test_default_resnet18_patch_stays_within_3_pct_and_near_the_old_rank_8(allocation):
    net = DeltaNetwork(random_base())
    net.add_task("t", 10, make_config("lowrank", {"budget_pct": 3.0, "allocation": allocation}))
    trainable, total = net.parameter_counts("t")
    stored = sum(t.numel() for t in net.task_state_dict("t").values())  # + BatchNorm statistics
    assert 2.7 <= 100 * trainable / total < 100 * stored / total <= 3.0  # rank 8 everywhere was 2.70 %
    ranks = net.task_configs["t"].ranks
    assert len(ranks) == 20 and all(r >= 1 for r in ranks.values())
    lora_a = net.model.layer4[1].conv2.per_task["t"].lora_A
    assert lora_a.shape[0] == ranks["layer4.1.conv2"]  # the layer really has its allocated rank


def test_without_a_budget_one_rank_everywhere_and_with_one_an_explicit_rank_is_capped():
    net = DeltaNetwork(random_base())
    net.add_task("wide", 10, make_config("lowrank", {"rank": 32}))  # no budget: no cap
    trainable, total = net.parameter_counts("wide")
    assert 100 * trainable / total > 3.0 and net.task_configs["wide"].ranks == {}
    assert net.model.conv1.per_task["wide"].rank == 27 and net.model.layer4[1].conv2.per_task["wide"].rank == 32
    assert net.task_configs["wide"].to_dict() == {"rank": 32}  # as before the budget
    with pytest.raises(BudgetError, match="above delta.budget_pct 3"):  # an explicit rank the budget cannot pay
        net.add_task("over", 10, make_config("lowrank", {"rank": 32, "budget_pct": 3.0}))
    net.add_task("eight", 10, make_config("lowrank", {"rank": 8, "budget_pct": 3.0}))  # the override: rank 8 everywhere
    assert net.task_configs["eight"].ranks == {} and net.model.layer4[1].conv2.per_task["eight"].rank == 8
    net.add_task("fit", 10, make_config("lowrank", {"budget_pct": 3.0}))  # the budget alone: allocated ranks
    assert 100 * net.parameter_counts("fit")[0] / total <= 3.0 and len(set(net.task_configs["fit"].ranks.values())) >= 1
    assert "rank" not in net.task_configs["fit"].to_dict() and net.task_configs["fit"].to_dict()["ranks"]
    net.add_task("plain", 10, make_config("lowrank", {}))  # neither: DEFAULT_RANK everywhere
    assert net.model.layer4[1].conv2.per_task["plain"].rank == DEFAULT_RANK


def test_other_kinds_are_capped_by_a_budget():
    net = DeltaNetwork(random_base())
    with pytest.raises(BudgetError, match=r"stores \d+ values .* above delta.budget_pct 0.05"):
        net.add_task("chan", 10, make_config("channel", {"budget_pct": 0.05}))
    assert "chan" not in net.tasks and all("chan" not in w.per_task for _, w in net._wrappers())
    net.add_task("chan", 10, make_config("channel", {"budget_pct": 3.0}))
    net.add_task("free", 10, make_config("channel", {}))  # no budget: no cap


def test_recorded_ranks_must_fit_the_network():
    net = DeltaNetwork(random_base())
    config = make_config("lowrank", {"ranks": {"conv1": 2, "layer9.conv": 3}})
    with pytest.raises(DeltapatchError, match="does not fit this base model"):
        net.add_task("t", 3, config)
    with pytest.raises(ValueError, match="integers >= 0"):
        make_config("lowrank", {"ranks": {"conv1": -1}})
    assert net.tasks == [] and torch.is_tensor(net.model.conv1.frozen.weight)


@torch.no_grad()
def test_layers_left_without_a_delta_save_load_and_merge(tmp_path, images):
    from deltapatch.delta.patch import PatchMeta, load_patch, save_patch
    from tests.delta.conftest import perturb

    net = DeltaNetwork(random_base())
    net.add_task("thin", 3, make_config("lowrank", {"budget_pct": 0.5}))  # rank 1 everywhere would not fit
    ranks = net.task_configs["thin"].ranks
    assert 0 in ranks.values() and max(ranks.values()) >= 1
    assert sum(t.numel() for t in net.task_state_dict("thin").values()) <= 0.005 * net.base_params
    perturb(net.task_parameters("thin"))
    expected = net.select("thin")(images)
    meta = PatchMeta(task="thin", class_names=["a", "b", "c"], delta_kind="lowrank",
                     delta_config=net.task_configs["thin"].to_dict(), base_arch="resnet18",
                     base_fingerprint=net.base_fingerprint, input_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    save_patch(net, meta, tmp_path)
    target = DeltaNetwork(random_base())
    load_patch(target, tmp_path)
    assert target.task_configs["thin"].ranks == ranks
    assert torch.equal(target.select("thin")(images), expected)
    target.merge("thin")
    torch.testing.assert_close(target(images), expected, rtol=1e-4, atol=1e-4)


def test_a_thin_base_under_the_default_budget_is_told_the_budget_that_covers_every_layer():
    """MobileNetV3-small: norm layers + head take most of 3 %, so layers go without a Δ (measured
    accuracy cost: docs/benchmark.md); the note names the budget from which every layer has one."""
    net = DeltaNetwork(random_base("mobilenet_v3_small"))
    net.add_task("tight", 10, make_config("lowrank", {"budget_pct": 3.0}))
    missing = net.task_configs["tight"].layers_without_delta()
    assert missing > 0
    note = budget_note(net, "tight", 10)
    assert f"leaves {missing} of" in note and "allocation: auto or importance" in note and "delta.budget_pct to at least" in note
    enough = float(note.rsplit("at least ", 1)[1].split()[0])
    assert enough == pytest.approx(net.patch_layout(10).full_coverage_pct(), abs=0.1)
    net.add_task("covered", 10, make_config("lowrank", {"budget_pct": enough}))
    assert net.task_configs["covered"].layers_without_delta() == 0 and budget_note(net, "covered", 10) == ""
    assert budget_note(net, "tight", 10) != ""  # the first patch is unchanged by the second
