"""The bench's zero-shot domain shifts change the pixels, never the labels."""

from __future__ import annotations

import pytest
import torch

from deltapatch.data.dataset import Split
from deltapatch.data.shifts import SHIFTS, shifted


def _split() -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return Split(images, torch.arange(6))


def test_each_shift_moves_the_pixels_and_keeps_the_labels():
    split = _split()
    for name in SHIFTS:
        moved = shifted(split, name)
        assert moved.images.dtype == torch.uint8 and moved.images.shape == split.images.shape
        assert torch.equal(moved.labels, split.labels)
        assert not torch.equal(moved.images, split.images), name
    assert torch.equal(shifted(split, "invert").images, 255 - split.images)
    assert shifted(split, "contrast").images.float().std() < 0.5 * split.images.float().std()
    # blur: neighbouring pixels get closer (noise has no spatial correlation before)
    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:].float() - x[..., :-1].float()).abs().mean())
    assert roughness(shifted(split, "blur").images) < 0.5 * roughness(split.images)


def test_an_unknown_shift_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        shifted(_split(), "fog")
