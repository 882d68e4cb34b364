"""The embedded suite: deterministic, well-formed, written as plain ImageFolders."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from deltapatch.data import builtin
from deltapatch.data.splits import stratified_split
from deltapatch.errors import DatasetError


def test_every_task_is_deterministic_and_well_formed():
    for name in builtin.GENERATORS:
        images, labels, class_names = builtin.generate(name, 32, seed=0, per_class=6)
        again, labels_again, _ = builtin.generate(name, 32, seed=0, per_class=6)
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
        assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
        assert sorted(set(labels.tolist())) == list(range(len(class_names)))
        assert images.reshape(len(images), -1).max(1).min() > 100, f"{name}: a blank image"


def test_transformed_digits_are_what_they_say():
    digits, labels, _ = builtin.digits(32)
    inverted, _, _ = builtin.digits_inverted(32)
    rotated, _, _ = builtin.digits_rot90(32)
    _, parity, names = builtin.digits_parity(32)
    assert len(digits) == 1797
    assert np.array_equal(inverted, 255 - digits)
    assert np.array_equal(rotated[0], np.rot90(digits[0]))
    assert names == ["even", "odd"] and np.array_equal(parity, labels % 2)


def test_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(4), 20)
    first = stratified_split(labels, 0.15, 0.15, seed=7)
    assert np.array_equal(first, stratified_split(labels, 0.15, 0.15, seed=7))
    assert not np.array_equal(first, stratified_split(labels, 0.15, 0.15, seed=8))
    for cls in range(4):
        counts = {s: int(((labels == cls) & (first == s)).sum()) for s in ("train", "val", "test")}
        assert counts == {"train": 14, "val": 3, "test": 3}


def test_write_imagefolder_layout(tmp_path):
    root = builtin.write_imagefolder("shapes", tmp_path, 32, 0, per_class=3)
    classes = sorted(p.name for p in root.iterdir())
    assert classes == sorted(builtin.SHAPE_NAMES)
    files = sorted(root.glob("*/*.png"))
    assert len(files) == 15
    with Image.open(files[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_fashion_mnist_reads_the_debian_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images, labels, names = builtin.generate("fashion-mnist", 28, seed=0, per_class=3)
    assert names[0] == "T-shirt-top" and names[9] == "Ankle boot" and len(names) == 10
    assert np.bincount(labels).tolist() == [3] * 10
    # the IDX file itself, decoded independently of torchvision: 16-byte header, then 28×28 bytes each
    raw = gzip.decompress((builtin.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").read_bytes())
    assert int.from_bytes(raw[4:8], "big") == 60_000
    pool = np.frombuffer(raw[16:], dtype=np.uint8).reshape(-1, 28, 28)
    first = images[0, :, :, 0]
    keep = builtin._subset_per_class(np.concatenate([
        np.frombuffer(gzip.decompress((builtin.FASHION_MNIST_DIR / f).read_bytes())[8:], dtype=np.uint8)
        for f in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz")]).astype(np.int64), 3, 0)
    assert keep[0] < 60_000 and np.array_equal(first, pool[keep[0]])  # exactly the scan chosen


def test_fashion_mnist_without_the_package_names_it_and_the_install(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "nothing-here")
    with pytest.raises(DatasetError, match=r"dataset-fashion-mnist.*apt-get install dataset-fashion-mnist"):
        builtin.generate("fashion-mnist", 28, seed=0, per_class=3)
