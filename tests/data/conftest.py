"""Fixtures for ingestion/versioning tests: a real git + DVC project in a temp folder per test.

A template project is set up once per session (`git init`, `dvc init`, local remote, data.dvc,
params.yaml committed) and copied for each test: a fresh `ensure_project_repo` costs ~1.5 s.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from deltapatch.config import load_params
from deltapatch.data.versioning import ensure_project_repo, git
from deltapatch.telemetry import disable_telemetry

disable_telemetry()

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def pytest_configure(config: pytest.Config) -> None:
    # DVC 3.67's own use of pygtrie (`_NoneStep.value`) warns on every add/status: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:_NoneStep.value:DeprecationWarning")


@pytest.fixture(scope="session")
def template_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "proj"
    root.mkdir()
    shutil.copy(PARAMS, root / "params.yaml")
    ensure_project_repo(root, load_params(root))
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "add params.yaml")
    return root


@pytest.fixture
def project(template_project: Path, tmp_path: Path) -> dict[str, Any]:
    """params of a fresh copy of the template project (``params['_root']`` is its folder)."""
    root = tmp_path / "proj"
    # .dvc/tmp holds DVC's locks and state databases of the template: not copied, DVC recreates it.
    shutil.copytree(template_project, root, symlinks=True, ignore=_skip_dvc_tmp)
    return load_params(root)


def _skip_dvc_tmp(folder: str, names: list[str]) -> set[str]:
    return {"tmp"} if Path(folder).name == ".dvc" else set()


def write_image(
    path: Path, seed: int, size: tuple[int, int] = (10, 12), fmt: str = "PNG", mode: str = "RGB"
) -> Path:
    """A random-noise image (distinct per seed) in the given format and PIL mode."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    if mode == "I;16":  # 16-bit grey: PIL cannot convert RGB to it
        image = Image.fromarray(rgba[..., 0].astype(np.uint16) * 257)
    elif mode in ("RGBA", "LA"):
        image = Image.fromarray(rgba, "RGBA").convert(mode)
    else:
        image = Image.fromarray(rgba[..., :3], "RGB").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """make_dataset(name, classes=("a", "b"), n=6, splits=None, seed=0) → folder in ImageFolder layout.

    With splits={"train": 6, "test": 2}, images go to <split>/<class>/; otherwise to <class>/.
    Each image is distinct (seeded noise); `seed` shifts all of them.
    """

    def make(
        name: str = "toy",
        classes: tuple[str, ...] = ("a", "b"),
        n: int = 6,
        splits: dict[str, int] | None = None,
        seed: int = 0,
        where: Path | None = None,
    ) -> Path:
        root = (where or tmp_path / "inputs") / name
        counter = seed * 10_000
        layout = splits or {"": n}
        for split, count in layout.items():
            for cls in classes:
                for i in range(count):
                    counter += 1
                    write_image(root / split / cls / f"img{i}.png", counter)
        return root

    return make


@pytest.fixture
def image_writer() -> Callable[..., Path]:
    """The :func:`write_image` helper, as a fixture (test modules do not import conftest)."""
    return write_image


def repo_state(params: dict[str, Any]) -> tuple[str, str, str]:
    """(data.dvc text, HEAD commit, `git status --porcelain`) of the project."""
    root = Path(params["_root"])
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    return (root / "data.dvc").read_text(), git(root, "rev-parse", "HEAD").strip(), status


@pytest.fixture
def state() -> Callable[[dict[str, Any]], tuple[str, str, str]]:
    """state(params) → (data.dvc text, HEAD, git status): compare before/after an operation."""
    return repo_state
