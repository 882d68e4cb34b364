"""Task sources (`bench --tasks`, `stream --tasks`): built-in and ingested names, and a user's dataset
path validated like ingest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deltapatch.data.sources import builtin_task, resolve_task, with_shots
from deltapatch.errors import DatasetError
from tests.conftest import make_project


def _dataset(root: Path, classes: dict[str, int]) -> Path:
    """An ImageFolder of distinct noise images: classes = {name: count}."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def plain_project(tmp_path: Path) -> dict[str, Any]:
    return make_project(tmp_path / "proj")


def test_a_dataset_path_is_normalised_like_ingest_and_never_written_into_data(plain_project: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    source = _dataset(tmp_path / "street-signs", {"stop": 12, "yield": 12})
    data = resolve_task(plain_project, str(source), tmp_path / "work")
    assert data.name == "street-signs" and data.class_names == ["stop", "yield"]
    assert len(data.train) + len(data.val) + len(data.test) == 24
    assert tuple(data.train.images.shape[1:]) == (3, 32, 32)  # resized to the model input like ingest
    assert not (Path(plain_project["_root"]) / "data").exists()


def test_a_bad_dataset_path_gets_the_same_error_as_ingest_and_nothing_is_written(plain_project: dict[str, Any],
                                                                               tmp_path: Path) -> None:
    from deltapatch.data.ingest import ingest

    source = _dataset(tmp_path / "tiny", {"only": 8})  # one class: refused
    with pytest.raises(DatasetError) as from_bench:
        resolve_task(plain_project, str(source), tmp_path / "work")
    assert not (Path(plain_project["_root"]) / "data").exists()
    assert source.is_dir()  # the user's original is untouched
    with pytest.raises(DatasetError) as from_ingest:
        ingest(source, plain_project)
    assert str(from_ingest.value).startswith(str(from_bench.value))


def test_an_unknown_task_names_the_choices(plain_project: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a built-in task.*shapes.*deltapatch ingest PATH --task no-such-task"):
        resolve_task(plain_project, "no-such-task", tmp_path / "work")


def test_shots_are_stratified_reproducible_per_seed_and_leave_val_and_test_alone(plain_project):
    data = builtin_task(plain_project, "shapes", per_class=20)
    five = with_shots(data, 5, seed=0)
    assert torch.bincount(five.train.labels).tolist() == [5] * data.num_classes
    again, other = with_shots(data, 5, seed=0), with_shots(data, 5, seed=1)
    assert torch.equal(five.train.images, again.train.images)
    assert not torch.equal(five.train.images, other.train.images)
    for split in ("val", "test"):
        assert getattr(five, split) is getattr(data, split)
    # every chosen image is one of the task's own training images
    pool = {bytes(img.numpy()) for img in data.train.images}
    assert all(bytes(img.numpy()) in pool for img in five.train.images)
    assert with_shots(data, 0, seed=0).train is data.train  # 0: the whole training split


def test_more_shots_than_a_class_has_is_refused(plain_project):
    data = builtin_task(plain_project, "shapes", per_class=10)
    with pytest.raises(DatasetError, match=r"--shots 50 asks for 50 training images per class.*lower --shots"):
        with_shots(data, 50, seed=0)
