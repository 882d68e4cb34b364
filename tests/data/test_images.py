"""The one image pipeline: allow-list, header pixel check, EXIF, alpha, and no training–serving skew."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deltapatch.data.dataset import load_task_dir
from deltapatch.data.images import (
    ImageTooLarge,
    UnreadableImage,
    decode_rgb,
    load_pixels,
    read_image_files,
)
from deltapatch.data.ingest import ingest
from deltapatch.serve import Item, ServeSettings, decode_items
from tests.image_samples import bomb_png, encoded, exif_rotated_jpeg, large_photo, noise, rgba_png


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats_decode(fmt):
    assert load_pixels(encoded(fmt, seed=1), 16).shape == (16, 16, 3)


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "PPM"])
def test_other_formats_are_refused_by_format(fmt):
    data = encoded(fmt, seed=2)
    with Image.open(io.BytesIO(data)) as image:  # a valid file PIL itself would read
        assert image.format == fmt
    with pytest.raises(UnreadableImage, match="not a PNG, JPEG, WebP, BMP, GIF or TIFF image"):
        decode_rgb(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module's filter
def test_pixel_count_is_checked_from_the_header_before_decoding():
    bomb = bomb_png(12_000, 12_000)  # ~100 bytes; its pixel data is junk and is never decoded
    with pytest.raises(ImageTooLarge, match="12000×12000 = 144000000 pixels") as info:
        decode_rgb(bomb, max_pixels=16_000_000)
    assert info.value.pixels == 144_000_000
    with pytest.raises(ImageTooLarge, match="^900000000 pixels$") as info:  # PIL's own guard, inside open()
        decode_rgb(bomb_png(30_000, 30_000), max_pixels=10**12)
    assert info.value.pixels == 900_000_000
    real = encoded("PNG", size=120)
    with pytest.raises(ImageTooLarge, match="120×120 = 14400 pixels"):
        decode_rgb(real, max_pixels=14_399)
    assert decode_rgb(real, max_pixels=14_400).size == (120, 120)


def test_truncated_and_fake_files_are_unreadable():
    png = encoded("PNG", size=64)
    with pytest.raises(UnreadableImage, match="unreadable or truncated"):
        decode_rgb(png[: len(png) // 2])
    with pytest.raises(UnreadableImage, match="unsupported format"):
        decode_rgb(b"GIF89a but not really")


def test_exif_orientation_and_alpha_on_white():
    upright = decode_rgb(exif_rotated_jpeg(3, width=48, height=30))
    assert upright.size == (30, 48), "orientation 6 turns the 48×30 landscape into a 30×48 portrait"
    pixels = load_pixels(rgba_png(4, 40, 40), 40)
    assert (pixels[:20] == 255).all(), "fully transparent pixels become white"
    assert not (pixels[20:] == 255).all()


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    pixels = load_pixels(buffer.getvalue(), 8)
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_training_and_serving_see_bit_identical_inputs(project, tmp_path):
    """The same source files through ingest → training loading, through serve, through `predict`."""
    sources = {
        "a/rotated.jpg": exif_rotated_jpeg(10), "a/alpha.png": rgba_png(11), "a/photo.jpg": large_photo(12),
        "b/rotated.jpg": exif_rotated_jpeg(20), "b/alpha.png": rgba_png(21), "b/photo.jpg": large_photo(22),
    }
    root = tmp_path / "skew"
    for rel, data in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    project["data"]["min_images_per_class"] = 3
    size = int(project["base"]["input_size"])
    result = ingest(root, project, task="skew")
    assert not result.skipped and sum(result.n_images.values()) == 6

    data = load_task_dir(result.task_dir, size)
    trained = [img.permute(1, 2, 0).numpy() for split in (data.train, data.val, data.test) for img in split.images]

    items = [Item(task="base", image=base64.b64encode(raw).decode()) for raw in sources.values()]
    with ThreadPoolExecutor(2) as pool:
        served = decode_items(items, size, ServeSettings(), pool)
    predicted = read_image_files([root / rel for rel in sources], size)

    assert served.dtype == np.uint8 and served.shape == (6, size, size, 3)
    assert np.array_equal(served, predicted)
    found = set()
    for i, rel in enumerate(sources):
        matches = [j for j, t in enumerate(trained) if np.array_equal(t, served[i])]
        assert len(matches) == 1, f"{rel}: its serve input is not bit-identical to one training input"
        found.add(matches[0])
    assert found == set(range(6)), "one training input per source file"


def test_training_loader_names_a_broken_task_file(project, tmp_path):
    from deltapatch.errors import DatasetError

    folder = tmp_path / "task"
    for split in ("train", "val", "test"):
        (folder / split / "a").mkdir(parents=True)
        Image.fromarray(noise(1, 8, 8)).save(folder / split / "a" / "x.png")
    (folder / "train" / "a" / "x.png").write_bytes(b"broken")
    rows = "path,class,split,sha256\n" + "".join(f"{s}/a/x.png,a,{s},0\n" for s in ("train", "val", "test"))
    (folder / "manifest.csv").write_text(rows)
    with pytest.raises(DatasetError, match=r"train/a/x.png: .*re-ingest the task"):
        load_task_dir(Path(folder), 8)
