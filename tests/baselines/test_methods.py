"""Each method trains a few steps on a tiny task, learns it, and keeps its interface invariants."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deltapatch.baselines import METHODS
from deltapatch.baselines.base import Method
from deltapatch.baselines.paint import Paint, interpolate
from deltapatch.baselines.peft_lora import PeftLora, lora_param_count
from deltapatch.train import accuracy, fit, predict_logits

# Small settings where a method has some; every test reuses one trained instance per method.
OPTIONS: dict[str, dict[str, Any]] = {"peft-lora": {"r": 2, "lora_alpha": 2}, "paint": {"alphas": [0.0, 0.5, 1.0]}}
_TRAINED: dict[str, Method] = {}
_UNTRAINED_ACC: dict[str, float] = {}


def train_one(name: str, context: Any, data: Any, settings: Any) -> Method:
    """`name` trained on `data` (cached for the test session: training is the slow part). The training
    accuracy of the same method before any step is kept in _UNTRAINED_ACC."""
    if name not in _TRAINED:
        method = METHODS[name](context, METHODS[name].settings_class(**OPTIONS.get(name, {})))
        torch.manual_seed(0)
        trainable = method.prepare(data)
        _UNTRAINED_ACC[name] = train_accuracy(method, context, data)
        fit(trainable, data, settings, context.norm, progress=False)
        method.after_fit(data)
        _TRAINED[name] = method
    return _TRAINED[name]


def train_accuracy(method: Method, context: Any, data: Any) -> float:
    return accuracy(predict_logits(method.task_forward(), data.train, context.norm), data.train.labels)


def base_logits(method: Method, context: Any) -> torch.Tensor:
    return predict_logits(method.base_forward(), context.base_data.test, context.norm)


def test_registry_names() -> None:
    assert set(METHODS) == {"delta-lowrank", "delta-channel", "full-ft", "linear-probe", "bn-patch", "paint", "peft-lora"}
    assert all(cls.name == name for name, cls in METHODS.items())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_saves_and_serves(name: str, context: Any, tiny_task: Any, train_settings: Any,
                                        tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in context.base.model.state_dict().items()}
    method = train_one(name, context, tiny_task, train_settings)
    logits = predict_logits(method.task_forward(), tiny_task.test, context.norm)
    assert logits.shape == (len(tiny_task.test), tiny_task.num_classes)
    if isinstance(method, Paint):
        method.set_alpha(1.0)  # the fine-tuned end of the interpolation is what training moved
    # Training moved the metric: the method fits its training split far better than before training.
    assert train_accuracy(method, context, tiny_task) >= _UNTRAINED_ACC[name] + 0.15
    method.after_fit(tiny_task)
    assert base_logits(method, context).shape == context.reference_logits.shape
    size = method.save(tmp_path)
    assert size > 0 and size <= sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert method.trainable_params() > 0
    with method.merged() as merged:
        if merged is not None:  # folding in the adaptation must not change the function
            x = context.norm(tiny_task.test.images)
            torch.testing.assert_close(merged(x), method.task_forward()(x), atol=1e-3, rtol=1e-3)
    # No method may modify the shared pristine base model.
    after = context.base.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["delta-channel", "delta-lowrank", "linear-probe", "bn-patch"])
def test_routed_methods_keep_base_bit_identical(name: str, context: Any, tiny_task: Any, train_settings: Any) -> None:
    method = train_one(name, context, tiny_task, train_settings)
    assert torch.equal(base_logits(method, context), context.reference_logits)


def test_linear_probe_trains_only_the_head(context: Any, tiny_task: Any, train_settings: Any) -> None:
    method = train_one("linear-probe", context, tiny_task, train_settings)
    head: nn.Linear = method.model.head  # type: ignore[attr-defined]
    assert method.trainable_params() == head.weight.numel() + head.bias.numel()
    assert method.trainable_params() == (context.base.model.fc.in_features + 1) * tiny_task.num_classes


def test_full_ft_changes_the_backbone(context: Any, tiny_task: Any, train_settings: Any) -> None:
    method = train_one("full-ft", context, tiny_task, train_settings)
    tuned = method.model.backbone.state_dict()  # type: ignore[attr-defined]
    base = context.base.model.state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in tuned if k.endswith("weight"))
    assert method.trainable_params() == sum(p.numel() for p in method.model.parameters())  # type: ignore[attr-defined]


def test_peft_lora_trainable_params_match_lora_count(context: Any, tiny_task: Any, train_settings: Any) -> None:
    method = train_one("peft-lora", context, tiny_task, train_settings)
    assert isinstance(method, PeftLora)
    head = (context.base.model.fc.in_features + 1) * tiny_task.num_classes
    expected = lora_param_count(context.base.model, r=2) + head  # every Conv2d is targeted
    assert method.trainable_params() == expected
    # PEFT's standard recipe leaves the base BatchNorms in train mode: training moves their statistics
    # (the drift bench.md reports). Δ-patches exist to avoid exactly this.
    assert method.base_bn_stats_changed() > 0.0


def test_paint_alpha_in_unit_interval_and_zero_is_base(context: Any, tiny_task: Any, train_settings: Any) -> None:
    method = train_one("paint", context, tiny_task, train_settings)
    assert isinstance(method, Paint)
    assert 0.0 <= method.alpha <= 1.0 and set(method.alpha_scores) == {0.0, 0.5, 1.0}
    method.set_alpha(0.0)
    base = context.base.model.state_dict()
    assert all(torch.equal(v, base[k]) for k, v in method.model.backbone.state_dict().items())
    assert torch.equal(base_logits(method, context), context.reference_logits)
    with pytest.raises(ValueError):
        method.set_alpha(1.5)
    mixed = interpolate({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)
    assert torch.equal(mixed["w"], torch.full((2,), 0.25))
