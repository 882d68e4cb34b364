"""ACC, BWT, forgetting and forward transfer on hand-made accuracy matrices, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from deltapatch.stream.metrics import (
    AccuracyMatrix,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)

# R[i][j]: accuracy on task j after learning task i (3 tasks).
HAND_MADE = AccuracyMatrix(["base", "a", "b"], [[0.9], [0.7, 0.8], [0.6, 0.5, 0.95]])


def test_acc_is_the_mean_of_the_last_row() -> None:
    # (0.6 + 0.5 + 0.95) / 3 = 2.05 / 3
    assert average_accuracy(HAND_MADE) == pytest.approx(0.683333333, abs=1e-9)


def test_bwt_is_final_minus_just_learned_over_all_but_the_last_task() -> None:
    # ((0.6 − 0.9) + (0.5 − 0.8)) / 2 = −0.3
    assert backward_transfer(HAND_MADE) == pytest.approx(-0.3, abs=1e-12)
    # Avalanche's Forgetting per task is the negative: 0.9 − 0.6 and 0.8 − 0.5.
    assert forgetting(HAND_MADE) == pytest.approx([0.3, 0.3])


def test_nothing_forgotten_gives_bwt_exactly_zero_and_gains_are_positive() -> None:
    frozen = AccuracyMatrix(["base", "a", "b"], [[0.9], [0.9, 0.4], [0.9, 0.4, 0.7]])
    assert backward_transfer(frozen) == 0.0
    improving = AccuracyMatrix(["base", "a"], [[0.5], [0.75, 0.6]])
    assert backward_transfer(improving) == pytest.approx(0.25)


def test_forward_transfer_is_before_training_minus_at_initialisation() -> None:
    # tasks 1 and 2: (0.30 − 0.20) and (0.10 − 0.25) → mean −0.025
    assert forward_transfer([0.30, 0.10], [0.20, 0.25]) == pytest.approx(-0.025)
    assert math.isnan(forward_transfer([], []))
    with pytest.raises(ValueError, match="as many"):
        forward_transfer([0.1], [])


def test_single_task_and_malformed_matrices() -> None:
    single = AccuracyMatrix(["base"], [[0.8]])
    assert average_accuracy(single) == 0.8 and math.isnan(backward_transfer(single))
    with pytest.raises(ValueError, match="row 1 has 1 entries; expected 2"):
        AccuracyMatrix(["base", "a"], [[0.8], [0.7]])
