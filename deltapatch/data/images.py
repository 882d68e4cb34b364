"""The one image pipeline: ingestion, training data loading, `predict`, `serve` and the pyfunc model.

Every path from an image file (or the bytes of one) to the model's input goes through here, so the
same source gives the same input tensor at training time and at serving time (no training–serving
skew):

    decode_rgb(source, max_pixels)          → upright RGB PIL image (any size)
        1. open with an allow-list of formats (ALLOWED_FORMATS; GIF/TIFF: the first frame)
        2. check the header's pixel count BEFORE decoding (decompression bombs → ImageTooLarge)
        3. verify the structure, then decode fully (fake/truncated files → UnreadableImage)
        4. EXIF orientation applied, alpha composited on white, 16-bit/float scaled to 8 bits
    resize(image, size)                     → size × size with ONE filter (RESAMPLE, Lanczos)
    load_pixels(source, size, max_pixels)   → (size, size, 3) uint8: the three steps above

Ingestion stores ``resize(decode_rgb(file))`` as a lossless PNG; training reads that PNG back with
:func:`load_pixels` (already upright, RGB and at size, so the pixels come back unchanged); serving
and ``predict`` apply :func:`load_pixels` to the uploaded bytes. The two paths give bit-identical
arrays when the task's ``image_size`` equals the base's ``input_size`` (the default); otherwise the
trainer resizes the stored images a second time, which it cannot avoid.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deltapatch.errors import DatasetError

# PNG, JPEG, WebP, BMP, GIF (first frame), TIFF (first page). Anything else PIL could open (ICO, PSD,
# TGA, EPS, …) is refused by format: less decoder attack surface, and the API promises these only.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
RESAMPLE = Image.Resampling.LANCZOS  # the one resize filter (ingestion has always used it)
DEFAULT_MAX_PIXELS = 16_000_000      # data.max_image_pixels' default, for callers without params

# Our own pixel limit (checked right after the header is read) is what refuses large images; PIL's
# warning for images above its own, higher limit would only repeat that refusal on stderr. A
# process-wide filter, because warnings.catch_warnings() is not thread-safe (serve decodes in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

Source = bytes | str | os.PathLike[str]


class ImageError(DatasetError):
    """An image that cannot be used; the message says why (callers add the file or item)."""


class UnreadableImage(ImageError):
    """Not a decodable image of an allowed format: fake, truncated or unsupported."""


class ImageTooLarge(ImageError):
    """More pixels than allowed, read from the header before decoding (a decompression bomb?)."""

    def __init__(self, message: str, pixels: int | None = None) -> None:
        super().__init__(message)
        self.pixels = pixels


def _stream(source: Source) -> io.BytesIO | Path:
    return io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else Path(source)


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Raise ImageTooLarge when the (header) size of `image` exceeds `max_pixels`."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}×{height} = {width * height} pixels", width * height)


def decode_rgb(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file (path) or its bytes fully into an upright RGB image; see the module docstring.

    Raises:
        ImageTooLarge: above `max_pixels` (from the header, nothing decoded), or above PIL's own
            decompression-bomb guard.
        UnreadableImage: not an allowed format, or not decodable (fake, truncated, corrupt).
    """
    try:
        with Image.open(_stream(source), formats=ALLOWED_FORMATS) as image:
            check_pixels(image, max_pixels)
            image.verify()  # structure and checksums; the object is unusable afterwards
        with Image.open(_stream(source), formats=ALLOWED_FORMATS) as image:
            image.load()  # full decode: catches truncated pixel data that verify() misses
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:  # PIL's own guard, inside open(), before ours
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found.group(1)) if found else None
        raise ImageTooLarge(f"{pixels} pixels" if pixels else str(exc), pixels) from None
    except UnidentifiedImageError:
        raise UnreadableImage(f"not a {FORMAT_NAMES} image (fake or unsupported format)") from None
    except FileNotFoundError:
        raise UnreadableImage("no such file") from None
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, …
        raise UnreadableImage(f"unreadable or truncated ({type(exc).__name__}: {exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        peak = arr.max(initial=0.0)
        # The value range is not stored in the file: guess it from the data (0–1, 0–255 or 16 bits).
        full_scale = 1.0 if image.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
        image = Image.fromarray(np.clip(arr / full_scale * 255.0, 0, 255).round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, size: int) -> Image.Image:
    """`size` × `size` with the pipeline's one filter (unchanged when already that size)."""
    return image if image.size == (size, size) else image.resize((size, size), RESAMPLE)


def load_pixels(source: Source, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A file (path) or its bytes → (size, size, 3) uint8, exactly as the model sees it."""
    return np.asarray(resize(decode_rgb(source, max_pixels), size), dtype=np.uint8)


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of an RGB image or (H, W, 3) uint8 array; deterministic (no timestamps or text chunks)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def read_image_files(paths: list[Path], size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image files → (N, size, size, 3) uint8; an unusable file raises ImageError naming it."""
    arrays = []
    for path in paths:
        try:
            arrays.append(load_pixels(path, size, max_pixels))
        except ImageTooLarge as exc:
            raise ImageTooLarge(f"{path}: {exc}, above the limit of {max_pixels} pixels; downscale it",
                                exc.pixels) from None
        except ImageError as exc:
            raise type(exc)(f"{path}: {exc}; pass {FORMAT_NAMES} files") from None
    return np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 already decoded (e.g. given to the pyfunc model) → (N, size, size, 3) with
    the pipeline's filter; unchanged when already at size."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ImageError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] == (size, size):
        return images
    return np.stack([np.asarray(resize(Image.fromarray(img), size)) for img in images]) if len(images) else (
        np.zeros((0, size, size, 3), np.uint8))
