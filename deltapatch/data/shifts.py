"""Shifted copies of a test split that no method trains on: the bench's zero-shot domain shift.

    shifted(split, "blur")      # Gaussian blur, σ = 3 % of the image side
    shifted(split, "contrast")  # contrast × 0.4 (towards the mean grey)
    shifted(split, "invert")    # 255 − pixel

The labels are the split's; only the pixels move away from what the patch saw in training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms.v2 import functional as TF

from deltapatch.data.dataset import Split


def _blur(images: torch.Tensor) -> torch.Tensor:
    sigma = max(0.5, 0.03 * images.shape[-1])
    kernel = 2 * round(2 * sigma) + 1
    return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "blur": _blur,
    "contrast": lambda images: TF.adjust_contrast(images, 0.4),
    "invert": lambda images: 255 - images,
}


def shifted(split: Split, name: str) -> Split:
    """`split` with shift `name` applied to its (N, 3, H, W) uint8 images."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift '{name}'; known: {sorted(SHIFTS)}")
    return Split(SHIFTS[name](split.images).to(torch.uint8), split.labels)
