"""The ``data:`` settings, the project's data paths, and the types of data versioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltapatch.config import ConfigError, project_root, resolve_path, section
from deltapatch.errors import DeltapatchError

DVC_FILE_SUFFIX = ".dvc"
LOCK_NAME = "data.lock"
LOCK_TIMEOUT_S = 900.0  # an ingest of a large task may hold the lock for minutes
TRAILER_TASK = "Deltapatch-Task"
TRAILER_SHA = "Deltapatch-Manifest-Sha256"
GIT_IDENTITY = ("deltapatch", "deltapatch@localhost")
SETUP_MESSAGE = "data: set up DVC data versioning (deltapatch)"


class VersioningError(DeltapatchError):
    """git or DVC refused an operation on the project's data."""

    retryable = True  # mostly a DVC remote that did not answer, or a lock held by another process


@dataclass(frozen=True)
class DataSettings:
    """The ``data:`` section of params.yaml (every key must be listed here).

    root: DVC-tracked folder, relative to the project root (tasks land in ``<root>/tasks/<task>``).
    inbox: where new task datasets arrive; rejected inputs from here are *moved* to quarantine.
    image_size: side in pixels of the square RGB PNGs written for each image.
    val_fraction, test_fraction: per-class fractions for the automatic stratified split.
    min_images_per_class: a class with fewer usable images rejects the task.
    max_bad_fraction: above this fraction of unreadable/truncated/fake files the task is rejected.
    max_image_pixels: width × height above which an image is treated as a decompression bomb.
    max_extract_mb: total uncompressed size an archive may declare (archive bombs).
    max_extract_members: most members (files and folders) an archive may hold (millions of empty
        files pass the size budget but still exhaust inodes and time).
    dvc_remote: default DVC remote set up when the repository has none (a local folder relative to
        the project root, or any URL DVC understands); empty/null for none.
    """

    root: str = "data"
    inbox: str = "inbox"
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_images_per_class: int = 5
    max_bad_fraction: float = 0.1
    max_image_pixels: int = 16_000_000
    max_extract_mb: int = 2048
    max_extract_members: int = 200_000
    dvc_remote: str | None = ".deltapatch/dvc-remote"


@dataclass(frozen=True)
class DataVersion:
    """Identity of the data a patch was trained on.

    git_commit: full sha of the git commit that recorded ``data.dvc``.
    data_md5: the ``md5`` DVC wrote for the ``data`` output at that commit (e.g. ``<32 hex>.dir``).
    manifest_sha256: sha256 (64 hex) of ``data/tasks/<task>/manifest.csv``.
    task: task name, or None for a commit of ``data.dvc`` not made by an ingest.
    committed_at: ISO-8601 commit date (informational, not part of the identity).
    """

    git_commit: str
    data_md5: str
    manifest_sha256: str
    task: str | None = None
    committed_at: str = field(default="", compare=False)

    def __str__(self) -> str:
        """Compact form ``<commit[:12]>:<data md5>:<manifest sha[:12]>`` (accepted by `checkout`)."""
        return f"{self.git_commit[:12]}:{self.data_md5}:{self.manifest_sha256[:12]}"

    def as_dict(self) -> dict[str, str | None]:
        """Plain dict for MLflow tags / JSON (keys: git_commit, data_md5, manifest_sha256, task, id)."""
        return {
            "git_commit": self.git_commit,
            "data_md5": self.data_md5,
            "manifest_sha256": self.manifest_sha256,
            "task": self.task,
            "id": str(self),
        }


# ----------------------------------------------------------------------------------------- settings


def data_settings(params: dict[str, Any]) -> DataSettings:
    """Build and sanity-check :class:`DataSettings` from params.yaml's ``data:`` section."""
    settings = section(params, "data", DataSettings)
    problems = []
    if int(settings.image_size) < 8:
        problems.append(f"image_size={settings.image_size} (must be ≥ 8)")
    fractions = (settings.val_fraction, settings.test_fraction)
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        problems.append(f"val_fraction/test_fraction={fractions} (each in [0, 1), sum < 1)")
    if int(settings.min_images_per_class) < 1:
        problems.append(f"min_images_per_class={settings.min_images_per_class} (must be ≥ 1)")
    if not 0 <= settings.max_bad_fraction < 1:
        problems.append(f"max_bad_fraction={settings.max_bad_fraction} (must be in [0, 1))")
    limits = (settings.max_image_pixels, settings.max_extract_mb, settings.max_extract_members)
    if any(int(limit) < 1 for limit in limits):
        problems.append("max_image_pixels, max_extract_mb and max_extract_members must be positive")
    if problems:
        raise ConfigError("params.yaml: invalid data settings: " + "; ".join(problems))
    return settings


def data_root(params: dict[str, Any], settings: DataSettings | None = None) -> Path:
    """Absolute path of the DVC-tracked data folder; it must lie inside the project."""
    settings = settings or data_settings(params)
    root = project_root(params).resolve()
    path = resolve_path(params, settings.root).resolve()
    if path == root or not path.is_relative_to(root):
        raise ConfigError(
            f"params.yaml: data.root={settings.root!r} must be a sub-folder of the project {root}"
        )
    return path


def tasks_dir(params: dict[str, Any]) -> Path:
    """``<data root>/tasks``: one folder per ingested task."""
    return data_root(params) / "tasks"


def quarantine_dir(params: dict[str, Any]) -> Path:
    """``<data root>/quarantine``: rejected inputs, excluded from data versions by .dvcignore."""
    return data_root(params) / "quarantine"


def _dvc_file(params: dict[str, Any]) -> Path:
    path = data_root(params)
    return path.with_name(path.name + DVC_FILE_SUFFIX)


def _rel(params: dict[str, Any], path: Path) -> str:
    return path.relative_to(project_root(params).resolve()).as_posix()

