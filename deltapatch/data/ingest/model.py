"""What ingestion produces and reports: constants of the task layout, result types, errors.

The rules and the layout are specified in docs/ingestion.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deltapatch.data.versioning import DataVersion
from deltapatch.errors import DatasetError
from deltapatch.task_names import RESERVED_TASK_NAMES, TASK_NAME_RE  # noqa: F401  (re-exported)

Status = Literal["new", "new-version", "unchanged"]

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ["path", "class", "split", "sha256"]
TASK_YAML = "task.yaml"
TASK_YAML_KEYS = {"name", "description", "image_size"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
MAX_LISTED = 10  # problems listed in one error message; reason.txt holds them all


class RejectedInput(DatasetError):
    """The input was refused; it is kept in ``quarantine_dir`` (None when there was nothing to keep)."""

    def __init__(self, message: str, quarantine_dir: Path | None = None) -> None:
        super().__init__(message)
        self.quarantine_dir = quarantine_dir


@dataclass(frozen=True)
class BadFile:
    """An image that was skipped: `path` relative to the dataset root, `reason` in words."""

    path: str
    reason: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Source files with identical normalised content (sha256 of the PNG).

    sources: their paths relative to the dataset root; classes/splits: where they landed (sorted).
    """

    sha256: str
    sources: tuple[str, ...]
    classes: tuple[str, ...]
    splits: tuple[str, ...]

    @property
    def across_splits(self) -> bool:
        """The same image in two splits: evaluation leaks training data."""
        return len(self.splits) > 1

    @property
    def across_classes(self) -> bool:
        """The same image under two labels."""
        return len(self.classes) > 1


@dataclass
class IngestResult:
    """What :func:`ingest` did.

    status: "new" (first data version of the task), "new-version" (the task existed with other
        content), "unchanged" (this exact content is already ingested: as this task, or as the
        task named by `duplicate_of`; nothing was written).
    task_dir: ``data/tasks/<task>`` (for "unchanged" with `duplicate_of`, that task's folder).
    n_images: images per split, e.g. {"train": 70, "val": 15, "test": 15}.
    classes: class names, sorted (index = position).
    skipped: unreadable/truncated/fake files left out (copied to `skipped_quarantine`).
    duplicates: groups of identical images; see :class:`DuplicateGroup`.
    data_version: the data version holding this content (None only when no commit holds it).
    previous_version: for "new-version", the task's latest version before this ingest.
    warnings: things the user should know that did not stop the ingest (e.g. `dvc push` failed).
    """

    task: str
    status: Status
    task_dir: Path
    manifest_sha256: str
    n_images: dict[str, int]
    classes: list[str]
    skipped: list[BadFile] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    data_version: DataVersion | None = None
    duplicate_of: str | None = None
    previous_version: DataVersion | None = None
    skipped_quarantine: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def duplicates_across_splits(self) -> list[DuplicateGroup]:
        return [d for d in self.duplicates if d.across_splits]


@dataclass
class NormalisedImage:
    """One accepted image: `source` relative to the dataset root, normalised PNG in `blob`."""

    source: str
    cls: str
    split: str | None  # None: to be assigned
    sha256: str
    blob: Path


@dataclass
class PreparedTask:
    """A validated, normalised task waiting in staging to be published."""

    task: str
    folder: Path
    manifest_sha256: str
    n_images: dict[str, int]
    classes: list[str]
    skipped: list[BadFile]
    duplicates: list[DuplicateGroup]
    dataset_root: Path
    warnings: list[str]
    source: Path



def listing(items: list[str]) -> str:
    """'a, b, c' with at most MAX_LISTED items and '… and N more'."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
