"""The probe set of a base without labelled base-task data (an ImageNet backbone from a package).

    base.eval_set: probe:photos

A fixed set of real photos (the ones scikit-image ships in its wheel: a cat, coffee, a motorcycle,
a rocket, …), each whole and as four corner crops and a centre crop, labelled with the untouched
base's OWN top-1. The base checks keep their meaning on it: the base route's logits must be
bit-identical to the pristine base's, and "base accuracy" reads as agreement with the base's own
top-1 (1.0 for an untouched base), which is what PAINT's α rule and the bench's base_acc_change use.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltapatch.data.dataset import Split, TaskData
from deltapatch.data.images import decode_rgb, resize
from deltapatch.errors import DatasetError
from deltapatch.models.base import BaseModel, load_base
from deltapatch.train import Normalizer, predict_logits

PROBE_PREFIX = "probe:"
PROBE_SETS = {"photos"}
# scikit-image's photographs of objects and scenes (its test patterns and micrographs left out).
PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png",
          "color.png", "grass.png", "gravel.png", "horse.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "coins.png",
          "moon.png", "text.png")
CROP = 0.6  # side of each corner/centre crop, as a fraction of the photo's shorter side
# How a base check on a probe set reads (the gate's detail, doctor's line).
AGREEMENT = "no labelled base-task data, so accuracy here is agreement with the pristine base's own top-1"


def photo_folder() -> Path:
    try:
        return Path(str(importlib.resources.files("skimage") / "data"))
    except ModuleNotFoundError:
        raise DatasetError("base.eval_set probe:photos reads the photos inside scikit-image; "
                           "pip install scikit-image (make setup installs it)") from None


def probe_images(size: int) -> np.ndarray:
    """(N, size, size, 3) uint8: each photo whole, then its four corner crops and centre crop."""
    folder = photo_folder()
    images: list[np.ndarray] = []
    for name in PHOTOS:
        photo = decode_rgb(folder / name)
        width, height = photo.size
        side = int(min(width, height) * CROP)
        boxes = [(0, 0), (width - side, 0), (0, height - side), (width - side, height - side),
                 ((width - side) // 2, (height - side) // 2)]
        views = [photo] + [photo.crop((x, y, x + side, y + side)) for x, y in boxes]
        images.extend(np.asarray(resize(view, size), dtype=np.uint8) for view in views)
    return np.stack(images)


def probe_task(params: dict[str, Any], name: str, base: BaseModel | None = None) -> TaskData:
    """The probe set `name`, labelled with the untouched base's own top-1 (val = test = the set).
    `base`: the project's base as already loaded from `params` (pristine), else loaded here."""
    if name not in PROBE_SETS:
        raise DatasetError(f"params.yaml base.eval_set '{PROBE_PREFIX}{name}': unknown probe set; use "
                           f"{', '.join(PROBE_PREFIX + s for s in sorted(PROBE_SETS))}")
    base = base or load_base(params)
    images = torch.from_numpy(probe_images(int(base.settings.input_size)).transpose(0, 3, 1, 2).copy())
    unlabelled = Split(images, torch.zeros(len(images), dtype=torch.int64))
    norm = Normalizer(base.settings.mean, base.settings.std, next(base.model.parameters()).device)
    labels = predict_logits(base.model, unlabelled, norm).argmax(1)
    split = Split(images, labels)
    empty = Split(images[:0], labels[:0])
    return TaskData(f"{PROBE_PREFIX}{name}", base.class_names, empty, split, split)
