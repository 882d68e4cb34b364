"""Image files that exercise the image pipeline, as bytes: shared by the data and the serving tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from deltapatch.bench_serve import bomb_png  # noqa: F401  (re-exported for the tests; one home)

EXIF_ORIENTATION = 0x0112


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(seed: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def exif_rotated_jpeg(seed: int, width: int = 48, height: int = 30) -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _save(Image.fromarray(noise(seed, width, height)), "JPEG", exif=exif, quality=90)


def rgba_png(seed: int, width: int = 40, height: int = 40) -> bytes:
    """A PNG with a varying alpha channel (half of it fully transparent)."""
    pixels = noise(seed, width, height, 4)
    pixels[: height // 2, :, 3] = 0
    return _save(Image.fromarray(pixels, "RGBA"), "PNG")


def large_photo(seed: int, width: int = 3000, height: int = 2000) -> bytes:
    """A photo-sized JPEG (smooth content with noise, like a camera image)."""
    small = Image.fromarray(noise(seed, 30, 20)).resize((width, height), Image.Resampling.BICUBIC)
    grain = np.random.default_rng(seed + 1).integers(-12, 13, (height, width, 3))
    pixels = np.clip(np.asarray(small, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return _save(Image.fromarray(pixels), "JPEG", quality=85)


def png_bytes(seed: int, width: int = 32, height: int = 32) -> bytes:
    return _save(Image.fromarray(noise(seed, width, height)), "PNG")


def flat_png(width: int, height: int) -> bytes:
    """A single-colour PNG: many pixels in few bytes."""
    return _save(Image.new("RGB", (width, height), (90, 140, 200)), "PNG")


def encoded(fmt: str, seed: int = 0, size: int = 24) -> bytes:
    """A valid image of size × size in PIL format `fmt` (e.g. ICO, TGA, PCX, GIF, TIFF)."""
    return _save(Image.fromarray(noise(seed, size, size)), fmt)

