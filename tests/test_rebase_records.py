"""The base gate's comparison: registered accuracies are tags rounded to 4 decimals; an equal count
ratio passes, one image fewer does not."""

from __future__ import annotations

from deltapatch.rebase_records import BaseGate


def _gate(new_acc: float, current_acc: float, tolerance: float = 0.0) -> BaseGate:
    return BaseGate(new_version=2, new_acc=new_acc, current_version=1, current_acc=current_acc, tolerance=tolerance)


def test_an_equal_accuracy_passes_against_its_rounded_tag():
    assert _gate(88 / 90, float(f"{88 / 90:.4f}")).passed  # 0.97778 vs the tag's 0.9778 (measured case)


def test_one_image_fewer_fails_even_on_a_large_test_set():
    assert not _gate(15_999 / 16_000, 1.0).passed
    assert _gate(15_999 / 16_000, 1.0, tolerance=1 / 16_000).passed
