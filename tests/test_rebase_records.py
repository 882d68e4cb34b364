"""The base gate's comparison (registered accuracies are tags rounded to 4 decimals; an equal count
ratio passes, one image fewer does not) and the rebase report's timing line."""

from __future__ import annotations

from deltapatch.gate import GateSettings
from deltapatch.rebase_records import BaseGate, RebaseOutcome, timing_line


def _gate(new_acc: float, current_acc: float, tolerance: float = 0.0) -> BaseGate:
    return BaseGate(new_version=2, new_acc=new_acc, current_version=1, current_acc=current_acc, tolerance=tolerance)


def test_an_equal_accuracy_passes_against_its_rounded_tag():
    assert _gate(88 / 90, float(f"{88 / 90:.4f}")).passed  # 0.97778 vs the tag's 0.9778 (measured case)


def test_one_image_fewer_fails_even_on_a_large_test_set():
    assert not _gate(15_999 / 16_000, 1.0).passed
    assert _gate(15_999 / 16_000, 1.0, tolerance=1 / 16_000).passed


def test_timing_line_compares_wall_time_with_the_sum_of_trainings():
    outcomes = [RebaseOutcome("a", 1, 0.9, train_seconds=40.0), RebaseOutcome("b", 1, 0.9, train_seconds=60.0),
                RebaseOutcome("c", 1, 0.9, reused=True)]  # reused: not trained, not counted
    line = timing_line(110.0, outcomes)
    assert "110.0 s" in line and "2 training(s)" in line and "100.0 s" in line and "1.10×" in line
    assert "nothing trained" in timing_line(5.0, outcomes[2:])


def test_default_rebase_tolerance_lets_one_image_of_90_through_but_not_three():
    tolerance = GateSettings().rebase_tolerance
    assert 89 / 90 >= 1.0 - tolerance
    assert 87 / 90 < 1.0 - tolerance
