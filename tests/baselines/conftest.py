"""Training settings for the baseline methods' tests (the bench context and tiny task: tests/conftest.py)."""

from __future__ import annotations

import dataclasses

import pytest

from deltapatch.train import TrainSettings


@pytest.fixture(scope="module")
def train_settings() -> TrainSettings:
    # 24 optimiser steps on 20 images: enough for every method to fit the training split visibly.
    return dataclasses.replace(TrainSettings(), epochs=1, min_steps=24, batch_size=16, lr=0.003, device="cpu")
