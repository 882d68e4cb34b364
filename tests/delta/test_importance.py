"""AdaLoRA-style layer importance from a pilot training: one weight per Δ layer, the network untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltapatch.data.dataset import from_arrays
from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.budget import allocate_ranks
from deltapatch.delta.importance import SensitivityMeter, layer_importance, with_importance_ranks
from deltapatch.delta.kinds.lowrank import LowRankConfig
from deltapatch.errors import DeltapatchError
from deltapatch.patching import budget_note
from deltapatch.train import Normalizer, TrainSettings
from tests.delta.conftest import random_base


def test_sensitivity_meter_scores_only_layers_that_got_gradients():
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    meter = SensitivityMeter({"used": [used], "unused": [unused]})
    for step in range(3):
        (used * torch.tensor([1.0, 2.0, 3.0 + step])).sum().backward()
    scores = meter.layer_scores()
    meter.close()
    assert scores["used"] > 0 and scores["unused"] == 0.0
    (used * 5).sum().backward()  # hooks removed: no further update
    assert meter.layer_scores() == scores


def _toy_data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    images = rng.integers(0, 256, (36, 16, 16, 3), dtype=np.uint8)
    images[labels == 1, :8] = 255  # a learnable signal
    return from_arrays("toy", images, labels, ["a", "b", "c"], val=0.2, test=0.2, seed=0)


def test_layer_importance_weights_every_layer_and_leaves_the_network_as_it_was():
    data = _toy_data()
    net = DeltaNetwork(random_base())
    norm = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    weights = layer_importance(net, "toy", data, TrainSettings(batch_size=8, lr=0.01), norm, budget_pct=3.0)
    layout = net.patch_layout(3)
    assert set(weights) == {layer.name for layer in layout.layers} and net.tasks == []
    assert all(w > 0 for w in weights.values())
    assert math.isclose(sum(math.log(w) for w in weights.values()), 0.0, abs_tol=1e-6)  # geometric mean 1
    assert max(weights.values()) / min(weights.values()) > 1.5  # layers really differ
    ranks = allocate_ranks(layout.layers, layout.delta_budget(3.0), "proportional", weights)
    assert sum(layer.lowrank_params(ranks[layer.name]) for layer in layout.layers) <= layout.delta_budget(3.0)


def test_allocation_importance_is_resolved_by_a_pilot_and_refused_without_one():
    """`delta.lowrank.allocation: importance`: with_importance_ranks gives ranks under the budget
    that differ from uniform ones; a network cannot resolve it alone (it needs the task's data)."""
    data = _toy_data()
    net = DeltaNetwork(random_base())
    norm = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    asked = make_config("lowrank", {"budget_pct": 3.0, "allocation": "importance"})
    with pytest.raises(DeltapatchError, match="with_importance_ranks"):
        net.add_task("toy", 3, asked)
    config = with_importance_ranks(net, "toy", data, asked, TrainSettings(batch_size=8, lr=0.01), norm)
    assert isinstance(config, LowRankConfig) and config.allocation == "importance" and net.tasks == []
    net.add_task("toy", 3, config)
    layout = net.patch_layout(3)
    ranks = net.task_configs["toy"].ranks
    assert sum(layer.lowrank_params(ranks[layer.name]) for layer in layout.layers) <= layout.delta_budget(3.0)
    assert ranks != allocate_ranks(layout.layers, layout.delta_budget(3.0), "uniform")
    assert net.task_configs["toy"].to_dict()["ranks"] == ranks  # what patch.json records
    uniform = make_config("lowrank", {"budget_pct": 3.0})
    assert with_importance_ranks(net, "toy", data, uniform, TrainSettings(), norm) is uniform  # no pilot


def test_auto_allocation_is_proportional_where_it_covers_every_layer_and_importance_where_it_cannot():
    """The shipped `allocation: auto`: ResNet-18 at 3 % gets proportional ranks with no pilot (a
    network resolves it alone); MobileNetV3-small at 3 %, where the budget cannot give every layer
    a Δ, gets importance ranks from a pilot, and no budget warning."""
    data = _toy_data()
    norm = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    settings = TrainSettings(batch_size=8, lr=0.01)
    auto = make_config("lowrank", {"budget_pct": 3.0, "allocation": "auto"})

    wide = DeltaNetwork(random_base())
    layout = wide.patch_layout(3)
    assert layout.covers_every_layer(3.0)
    settled = with_importance_ranks(wide, "toy", data, auto, settings, norm)
    assert isinstance(settled, LowRankConfig) and settled.allocation == "proportional" and not settled.ranks  # no pilot
    wide.add_task("toy", 3, auto)
    resolved = wide.task_configs["toy"]
    assert isinstance(resolved, LowRankConfig) and resolved.allocation == "proportional"
    assert resolved.ranks == allocate_ranks(layout.layers, layout.delta_budget(3.0), "proportional")
    assert resolved.ranks != allocate_ranks(layout.layers, layout.delta_budget(3.0), "uniform")

    thin = DeltaNetwork(random_base("mobilenet_v3_small"))
    thin_layout = thin.patch_layout(3)
    assert not thin_layout.covers_every_layer(3.0)
    with pytest.raises(DeltapatchError, match="'auto' needs importance ranks"):
        thin.add_task("toy", 3, auto)
    config = with_importance_ranks(thin, "toy", data, auto, settings, norm)
    assert isinstance(config, LowRankConfig) and config.allocation == "importance" and thin.tasks == []
    assert config.ranks != allocate_ranks(thin_layout.layers, thin_layout.delta_budget(3.0), "uniform")
    thin.add_task("toy", 3, config)
    assert thin.task_configs["toy"].to_dict()["allocation"] == "importance"  # patch.json says what ran
    assert budget_note(thin, "toy", 3) == ""
