"""The embedded default: a real base task and a stream of patch tasks, made offline.

- `digits`: scikit-learn's bundled handwritten digits (1797 real 8×8 scans), upscaled to RGB.
- `digits-inverted`, `digits-rot90`, `digits-parity`: the same scans, transformed or relabelled.
- `glyphs`: letters A–J rendered from the DejaVu fonts that ship inside matplotlib, with jitter.
- `shapes`: procedurally drawn circle/square/triangle/cross/star with colour and noise.
- `fashion-mnist`: real photos of clothing (Zalando's Fashion-MNIST, 70,000 28×28 grey images, 10
  classes), read by torchvision from the Debian package `dataset-fashion-mnist` (make setup installs it).

All generators are deterministic given the seed. Images: (N, S, S, 3) uint8; labels: (N,) int64.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import torchvision
from PIL import Image, ImageDraw, ImageFont

from deltapatch.errors import DatasetError

BASE_TASK = "digits"
GLYPH_LETTERS = list("ABCDEFGHIJ")
SHAPE_NAMES = ["circle", "square", "triangle", "cross", "star"]
Generated = tuple[np.ndarray, np.ndarray, list[str]]


def digits(size: int, seed: int = 0, per_class: int = 0) -> Generated:
    """scikit-learn's digits, bilinearly upscaled from 8×8 (0–16) to size×size RGB."""
    from sklearn.datasets import load_digits  # lazy: ~1 s (sklearn + scipy); used only by the digits tasks

    bunch = load_digits()
    scans = (bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack([_upscale(scan, size) for scan in scans])
    return images, bunch.target.astype(np.int64), [str(d) for d in range(10)]


def _upscale(gray: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(image)[:, :, None], 3, axis=2)


def digits_inverted(size: int, seed: int = 0, per_class: int = 0) -> Generated:
    images, labels, names = digits(size)
    return 255 - images, labels, names


def digits_rot90(size: int, seed: int = 0, per_class: int = 0) -> Generated:
    images, labels, names = digits(size)
    return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2))), labels, names


def digits_parity(size: int, seed: int = 0, per_class: int = 0) -> Generated:
    images, labels, _ = digits(size)
    return images, labels % 2, ["even", "odd"]


def _font_files() -> list[Path]:
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # The "Display" faces hold only a handful of glyphs, not the Latin alphabet.
    fonts = sorted(p for p in folder.glob("DejaVu*.ttf") if "Display" not in p.name)
    if not fonts:
        raise FileNotFoundError(f"no DejaVu fonts under {folder}; reinstall matplotlib")
    return fonts


def glyphs(size: int, seed: int = 0, per_class: int = 60) -> Generated:
    """Letters A–J in random DejaVu faces, with random rotation, scale, shift and contrast."""
    rng = np.random.default_rng(seed + 101)
    fonts = _font_files()
    images, labels = [], []
    for label, letter in enumerate(GLYPH_LETTERS):
        for _ in range(per_class):
            font = ImageFont.truetype(
                str(fonts[rng.integers(len(fonts))]), size=int(size * rng.uniform(0.55, 0.8))
            )
            canvas = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), letter, font=font)
            offset = rng.uniform(-0.1, 0.1, size=2) * size
            xy = (
                (size - (right - left)) / 2 - left + offset[0],
                (size - (bottom - top)) / 2 - top + offset[1],
            )
            draw.text(xy, letter, fill=int(rng.integers(170, 256)), font=font)
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
            images.append(_colourise(np.asarray(canvas), rng))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), list(GLYPH_LETTERS)


def _colourise(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gray (S, S) → RGB (S, S, 3) with a random foreground tint and pixel noise."""
    tint = rng.uniform(0.6, 1.0, size=3)
    noise = rng.normal(0, 12, size=(*gray.shape, 3))
    return (gray[:, :, None] * tint + noise).clip(0, 255).astype(np.uint8)


def _shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def polygon(n: int, radii: list[float]) -> list[tuple[float, float]]:
        return [
            (
                cx + radii[i % len(radii)] * math.cos(angle + 2 * math.pi * i / n),
                cy + radii[i % len(radii)] * math.sin(angle + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    if kind == "square":
        return polygon(4, [r])
    if kind == "triangle":
        return polygon(3, [r])
    if kind == "star":
        return polygon(10, [r, r * 0.45])
    if kind == "cross":
        w = r * 0.35
        arm = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    raise ValueError(kind)


def shapes(size: int, seed: int = 0, per_class: int = 60) -> Generated:
    """Filled shapes at random position, size, rotation and colour, with background noise."""
    rng = np.random.default_rng(seed + 202)
    images, labels = [], []
    for label, kind in enumerate(SHAPE_NAMES):
        for _ in range(per_class):
            canvas = Image.new("L", (size, size), 0)
            draw = ImageDraw.Draw(canvas)
            r = size * rng.uniform(0.22, 0.38)
            cx, cy = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
            if kind == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
            else:
                draw.polygon(_shape_points(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=255)
            images.append(_colourise(np.asarray(canvas), rng))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), list(SHAPE_NAMES)


# Where Debian's `dataset-fashion-mnist` puts the four IDX files (gzip-compressed). torchvision's reader
# wants them uncompressed under <root>/FashionMNIST/raw/: they are decompressed once into the cache.
FASHION_MNIST_DIR = Path(os.environ.get("DELTAPATCH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")


def fashion_mnist(size: int, seed: int = 0, per_class: int = 0) -> Generated:
    """Fashion-MNIST's 60,000 + 10,000 images pooled (the split is deltapatch's, like every task's),
    `per_class` of each class chosen by `seed` (0: all), upscaled to size×size RGB."""
    root = _fashion_mnist_root()
    parts = [torchvision.datasets.FashionMNIST(str(root), train=train, download=False) for train in (True, False)]
    grey = np.concatenate([part.data.numpy() for part in parts])
    labels = np.concatenate([part.targets.numpy() for part in parts]).astype(np.int64)
    if per_class:
        keep = _subset_per_class(labels, per_class, seed)
        grey, labels = grey[keep], labels[keep]
    # "T-shirt/top" → "T-shirt-top": a class name is a folder name in an ImageFolder (write_imagefolder).
    names = [name.replace("/", "-") for name in parts[0].classes]
    return np.stack([_upscale(image, size) for image in grey]), labels, names


def _fashion_mnist_root() -> Path:
    missing = [name for name in FASHION_MNIST_FILES if not (FASHION_MNIST_DIR / f"{name}.gz").is_file()]
    if missing:
        raise DatasetError(
            f"the fashion-mnist task reads the Debian package dataset-fashion-mnist, but {FASHION_MNIST_DIR} "
            f"has no {missing[0]}.gz; install it: sudo apt-get install dataset-fashion-mnist (or `make setup`), "
            f"or set DELTAPATCH_FASHION_MNIST_DIR to a folder with the four .gz files"
        )
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltapatch"
    raw = cache / "FashionMNIST" / "raw"
    for name in FASHION_MNIST_FILES:
        source = FASHION_MNIST_DIR / f"{name}.gz"
        target = raw / name
        if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
            raw.mkdir(parents=True, exist_ok=True)
            partial = raw / f"{name}.partial-{os.getpid()}"  # renamed when whole: no reader sees half a file
            with gzip.open(source, "rb") as compressed, partial.open("wb") as plain:
                shutil.copyfileobj(compressed, plain)
            partial.replace(target)
    return cache


GENERATORS: dict[str, Callable[..., Generated]] = {
    "digits": digits,
    "digits-inverted": digits_inverted,
    "digits-rot90": digits_rot90,
    "digits-parity": digits_parity,
    "glyphs": glyphs,
    "shapes": shapes,
    "fashion-mnist": fashion_mnist,
}
PATCH_TASKS = [name for name in GENERATORS if name != BASE_TASK]
REAL_TASKS = ["digits", "fashion-mnist"]  # real images (the rest are transformed or drawn)


def generate(name: str, size: int, seed: int, per_class: int) -> Generated:
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in task '{name}'; available: {sorted(GENERATORS)}")
    return GENERATORS[name](size, seed=seed, per_class=per_class)


def write_imagefolder(name: str, out_dir: Path, size: int, seed: int, per_class: int) -> Path:
    """Write built-in task `name` as a plain ImageFolder `<out_dir>/<name>/<class>/<i>.png`,
    at most `per_class` images per class (a seeded subset of the digits-based tasks)."""
    images, labels, class_names = generate(name, size, seed, per_class)
    keep = _subset_per_class(labels, per_class, seed)
    images, labels = images[keep], labels[keep]
    root = Path(out_dir) / name
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return root


def _subset_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of at most `per_class` samples of each class, chosen by `seed`, in original order."""
    rng = np.random.default_rng(seed + 303)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))
