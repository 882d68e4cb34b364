"""Learning-rate selection: chosen on the validation split, never on test."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from deltapatch.bench import BenchSettings, TrainedRun, select_by_validation
from deltapatch.bench.runner import TrainingCache, train_once
from deltapatch.data.dataset import Split
from deltapatch.train import FitResult, TrainSettings, accuracy, predict_logits

TINY = BenchSettings(epochs=1, min_steps=30, latency_batch=4, latency_repeats=1, latency_warmup=0)


def _run(lr: float, val_acc: float, val_loss: float = 1.0) -> TrainedRun:
    return TrainedRun(method=None, lr=lr, fitted=FitResult(), val_acc=val_acc, val_loss=val_loss,  # type: ignore[arg-type]
                      train_seconds=1.0)


def test_selection_maximises_validation_accuracy_then_lower_validation_loss() -> None:
    scores = {0.001: (0.6, 0.9), 0.01: (0.8, 0.7), 0.1: (0.8, 0.5)}
    best, runs = select_by_validation(list(scores), lambda lr: _run(lr, *scores[lr]))
    assert best.lr == 0.1 and [r.lr for r in runs] == [0.001, 0.01, 0.1]


def test_the_learning_rate_is_chosen_on_validation_even_when_test_disagrees(context: Any, tiny_task: Any) -> None:
    """A constructed task whose test labels are the UNTRAINED model's own predictions: there lr 0 is
    perfect on test, while the lr that learns the task wins on validation. A selection that peeked
    at test would pick lr 0."""
    settings = TrainSettings(batch_size=16, device="cpu")
    cache = TrainingCache(set())
    data = copy.copy(tiny_task)
    data.val = Split(data.train.images.clone(), data.train.labels.clone())  # val agrees with train

    def train_at(lr: float) -> TrainedRun:
        return train_once("linear-probe", data, context, TINY, settings, lr=lr, seed=0, cache=cache, progress=False)

    untrained = train_at(0.0).method.task_forward()
    own_guess = predict_logits(untrained, data.train, context.norm).argmax(1)
    data.test = Split(data.train.images.clone(), own_guess)

    best, runs = select_by_validation([0.0, 0.03], train_at)
    test_acc = {r.lr: accuracy(predict_logits(r.method.task_forward(), data.test, context.norm), data.test.labels)
                for r in runs}
    assert best.lr == 0.03
    assert test_acc[0.0] == 1.0 and test_acc[0.03] < 1.0, "the constructed case makes val and test disagree"


def test_methods_that_train_alike_train_once(context: Any, tiny_task: Any) -> None:
    """PAINT starts from full-ft's trained state at the same lr and seed instead of training again."""
    settings = TrainSettings(batch_size=16, device="cpu")
    cache = TrainingCache({"full-ft"})
    full = train_once("full-ft", tiny_task, context, TINY, settings, lr=0.001, seed=0, cache=cache, progress=False)
    paint = train_once("paint", tiny_task, context, TINY, settings, lr=0.001, seed=0, cache=cache, progress=False)
    assert paint.fitted is full.fitted  # the same training, reused
    paint.method.set_alpha(1.0)  # type: ignore[attr-defined]
    tuned, reused = full.method.model.state_dict(), paint.method.model.state_dict()  # type: ignore[attr-defined]
    # At α = 1 PAINT serves exactly the fine-tuned weights (integer BN counters come from the base).
    assert all(torch.equal(tuned[k], reused[k]) for k in tuned if tuned[k].is_floating_point())


def test_seeds_are_listed_from_the_project_seed() -> None:
    assert BenchSettings(seeds=3).seed_list(5) == [5, 6, 7]
    with pytest.raises(ValueError):
        BenchSettings(seeds=0).seed_list(0)
