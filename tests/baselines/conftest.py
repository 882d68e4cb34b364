"""A bench context on the session's quickly pre-trained base, and a tiny capped task."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from deltapatch.bench import BenchSettings, _capped, _open_context
from deltapatch.train import TrainSettings

TINY = BenchSettings(epochs=1, max_train_per_class=4, max_eval_per_class=3, latency_batch=4,
                     latency_repeats=1, latency_warmup=0)


@pytest.fixture(scope="module")
def context(base_project: dict[str, Any]) -> Any:
    ctx, _ = _open_context(base_project, TINY, seed=0, progress=False)
    return ctx


@pytest.fixture(scope="module")
def tiny_task(base_project: dict[str, Any]) -> Any:
    from deltapatch.data.sources import builtin_task

    return _capped(builtin_task(base_project, "shapes", per_class=12), TINY, seed=0)


@pytest.fixture(scope="module")
def train_settings() -> TrainSettings:
    return dataclasses.replace(TrainSettings(), epochs=1, batch_size=16, device="cpu")
