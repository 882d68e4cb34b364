"""Ingest a newly arriving task dataset: validate, normalise, quarantine, version with DVC.

Input: a folder in ImageFolder layout (``<root>/<class>/<image>``, images may sit in sub-folders of
a class), or a ``.zip`` / ``.tar`` / ``.tar.gz`` (``.tgz``) of one; optionally pre-split
(``<root>/{train,val,test}/<class>/<image>``); optionally a ``task.yaml`` beside the class folders
with ``name``, ``description`` and ``image_size``. A single wrapper folder (``foo.zip`` holding
``foo/<class>/…``) is looked through. Hidden files and ``__MACOSX`` are ignored.

Output: ``data/tasks/<task>/`` holding

- ``<split>/<class>/<sha256>.png`` – every image decoded, EXIF-rotated, converted to RGB
  (transparency composited on white, 16-bit scaled to 8-bit), resized to ``image_size`` ×
  ``image_size`` and re-encoded as PNG; the file name is the sha256 of the PNG bytes.
- ``manifest.csv`` – columns exactly ``path,class,split,sha256`` (path relative to the task
  folder, rows sorted by path), written with pandas.
- ``task.yaml`` – name, description, image_size, classes (sorted; a class's index is its position),
  number of images per split.

Why re-encode instead of copying the originals: the trainer gets one format, one size and one
colour mode (no decoding of large JPEGs, no colour-mode surprises at training time); metadata and
anything smuggled inside files is dropped; identical images collapse to one content-addressed
file; and the task folder, its manifest and therefore its hash are a pure function of the pixel
content, the image size and the seed — so "same content arriving twice" is detected exactly and the
DVC data version does not change. The originals are never modified (they stay where the user put
them; rejected ones are kept in quarantine), so a different ``image_size`` is one re-ingest away.

Rules:

- Hostile or malformed containers reject the whole input before anything is extracted: archive
  members with ``..`` or absolute paths, symlinks, hard links, device files and FIFOs, encrypted
  members, more than ``data.max_extract_mb`` uncompressed. Folders with symlinks or special files
  are rejected the same way.
- An image above ``data.max_image_pixels`` (decompression bomb) rejects the input.
- Unreadable, truncated or fake images are skipped and reported (and copied to quarantine), unless
  more than ``data.max_bad_fraction`` of the files are bad: then the input is rejected.
- Fewer than 2 classes, or a class with fewer than ``data.min_images_per_class`` usable images,
  rejects the input.
- Split: given ``train/val/test`` folders are kept; missing val/test are carved from train; with
  no split folders, :func:`deltapatch.data.splits.stratified_split` assigns one with the
  project's ``seed`` over images ordered by (class, sha256) — deterministic given the content.
- Duplicates (same PNG content): repeated copies within one class and split are dropped; copies
  across splits (train/test leakage) or classes (conflicting labels) are kept and reported.
- A rejected input is moved (when it lies in the inbox) or copied (anywhere else) to
  ``data/quarantine/<UTC time>-<name>/`` with ``reason.txt``; the user's original outside the
  inbox is never touched.
- A task name arriving again with other content replaces ``data/tasks/<task>/`` as a *new data
  version* (a new git commit of ``data.dvc``; the old one stays restorable with
  ``deltapatch data checkout``); the same content again is reported ``unchanged`` with the
  version it was first ingested as. Content identical to another task is reported the same way
  (``duplicate_of``) and not ingested twice. A changed ``description`` alone is not new content.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import uuid
import warnings
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from deltapatch.config import project_root, resolve_path, state_dir
from deltapatch.data.splits import SPLITS, stratified_split
from deltapatch.data.versioning import (
    DataSettings,
    DataVersion,
    assert_data_in_sync,
    commit_data_version,
    current_version,
    data_settings,
    ensure_project_repo,
    list_versions,
    locked,
    push_data,
    quarantine_dir,
    tasks_dir,
)
from deltapatch.errors import DatasetError

Status = Literal["new", "new-version", "unchanged"]

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ["path", "class", "split", "sha256"]
TASK_YAML = "task.yaml"
TASK_YAML_KEYS = {"name", "description", "image_size"}
RESERVED_TASK_NAMES = {"base"}
TASK_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
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
class _Image:
    """One accepted image: `source` relative to the dataset root, normalised PNG in `blob`."""

    source: str
    cls: str
    split: str | None  # None: to be assigned
    sha256: str
    blob: Path


@dataclass
class _Prepared:
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


class _BadImage(Exception):
    """A file that is not a usable image (counted against max_bad_fraction)."""


class _TooLarge(Exception):
    """An image above the pixel limit (rejects the input)."""


# -------------------------------------------------------------------------------------- public API


def validate_task_name(name: str) -> str:
    """Return `name` if it is a valid task name, else raise DatasetError saying why and what to use.

    Valid: 1–64 characters of lower-case letters, digits and ``-``, starting and ending with a
    letter or digit; ``base`` is reserved for the base task.
    """
    if name in RESERVED_TASK_NAMES:
        raise DatasetError(
            f"task name {name!r} is reserved for the base model's task; pass another name with --task"
        )
    if not TASK_NAME_RE.match(name):
        suggestion = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:58] or "my-task"
        suggestion = f"{suggestion}-task" if suggestion in RESERVED_TASK_NAMES else suggestion
        raise DatasetError(
            f"invalid task name {name!r}: use 1-64 lower-case letters, digits and '-', starting and "
            f"ending with a letter or digit; pass e.g. --task {suggestion}"
        )
    return name


def ingest(path: str | os.PathLike[str], params: dict[str, Any], task: str | None = None) -> IngestResult:
    """Validate the dataset at `path`, normalise it into ``data/tasks/<task>/`` and version it.

    Args:
        path: a folder (ImageFolder layout, optionally pre-split) or a .zip/.tar/.tar.gz of one.
        params: project params (``load_params()``); uses the ``data:`` section and ``seed``.
        task: task name; defaults to task.yaml's ``name``, else the folder/archive name.

    Returns:
        :class:`IngestResult` with the status and the data version to tag patches with.

    Raises:
        RejectedInput (a DatasetError): the input was refused; the message names the files and the
            fix, and the input is kept in ``data/quarantine/<UTC time>-<name>/``.
        VersioningError: git/DVC refused (e.g. an old data version is checked out).
    """
    settings = data_settings(params)
    src = Path(path).expanduser().absolute()
    if not src.exists():
        raise RejectedInput(
            f"{src}: no such file or folder; pass a folder of class sub-folders or a .zip/.tar/.tar.gz of one"
        )
    staging = state_dir(params) / "staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        try:
            prepared = _prepare(src, params, settings, staging, task)
        except DatasetError as exc:
            kept = quarantine(params, src, str(exc))
            where = kept.relative_to(project_root(params).resolve())
            # no square brackets: the CLI prints messages with rich markup
            raise RejectedInput(f"{exc} (input kept in {where}/)", kept) from None
        return _publish(prepared, params)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def normalise_elsewhere(path: str | os.PathLike[str], params: dict[str, Any], workdir: Path,
                        task: str | None = None) -> Path:
    """Validate and normalise `path` exactly like :func:`ingest`, into a task folder under `workdir`.

    Nothing in the project changes: no ``data/`` folder, no DVC version, no quarantine (a rejected
    input raises the same :class:`DatasetError` as ingest and stays where it is). Used to benchmark a
    user's own dataset (`deltapatch bench --tasks PATH`) before adopting it. Returns the task folder
    (``manifest.csv`` and the images), named after the task.
    """
    settings = data_settings(params)
    src = Path(path).expanduser().absolute()
    if not src.exists():
        raise DatasetError(
            f"{src}: no such file or folder; pass a folder of class sub-folders or a .zip/.tar/.tar.gz of one"
        )
    Path(workdir).mkdir(parents=True, exist_ok=True)
    prepared = _prepare(src, params, settings, Path(workdir), task)
    folder = prepared.folder.with_name(prepared.task)
    prepared.folder.rename(folder)
    return folder


def quarantine(
    params: dict[str, Any],
    src: Path,
    reason: str,
    files: list[BadFile] | None = None,
    name: str | None = None,
    origin: Path | None = None,
) -> Path:
    """Keep `src` in ``data/quarantine/<UTC time>-<name>/`` with a ``reason.txt``; return that folder.

    `src` is moved when it lies inside the inbox (it was delivered there for us) and copied
    otherwise (the user's original is never touched). Symlinks are copied as links (never followed)
    and special files (devices, FIFOs) are left out and listed in reason.txt.
    With `files`, only those files (paths relative to `src`) are copied, e.g. skipped bad images;
    `name` replaces ``src.name`` in the folder name; `origin` is the input named in reason.txt
    when `src` is a copy of it (an extracted archive).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name or src.name) or "input"
    dest = quarantine_dir(params) / f"{stamp}-{name}"
    while dest.exists():  # two rejections in the same microsecond
        dest = dest.with_name(dest.name + "-1")
    dest.mkdir(parents=True)
    left_out: list[str] = []
    if files is not None:
        for bad in files:
            target = dest / bad.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / bad.path, target, follow_symlinks=False)
        how = "the skipped files copied"
    elif _in_inbox(params, src):
        shutil.move(os.fspath(src), os.fspath(dest / src.name))
        how = "moved from the inbox"
    elif src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest / src.name, symlinks=True, ignore=_special_files(left_out, src))
        how = "copied, the original is untouched"
    else:
        shutil.copy2(src, dest / src.name, follow_symlinks=False)
        how = "copied, the original is untouched"
    lines = [
        f"source: {origin or src}",
        f"kept as: {dest / src.name if files is None else dest} ({how})",
        f"time (UTC): {stamp}",
        "",
        "reason:",
        reason,
    ]
    if files:
        lines += ["", "files:"] + [f"{b.path}: {b.reason}" for b in files]
    if left_out:
        lines += ["", "special files not copied:"] + left_out
    (dest / "reason.txt").write_text("\n".join(lines) + "\n")
    return dest


# --------------------------------------------------------------------------------- preparing a task


def _prepare(
    src: Path, params: dict[str, Any], settings: DataSettings, staging: Path, task: str | None
) -> _Prepared:
    """Validate and normalise `src` into ``staging/task`` (nothing in the project changes)."""
    if task is not None:
        validate_task_name(task)
    tree = _materialise(src, staging / "extract", settings)
    top = _dataset_root(tree)
    meta = _read_task_yaml(top)
    name = validate_task_name(task or meta.get("name") or _default_name(src))
    size = int(meta.get("image_size") or settings.image_size)
    files, stray = _layout(top)
    images, bad = _normalise_all(top, files, settings, size, staging / "blobs")
    _check_bad_fraction(bad, len(files), settings)
    images, repeats = _deduplicate(images)
    classes = _check_classes(images, files, settings)
    _assign_splits(images, settings, int(params.get("seed", 0)))
    duplicates = _duplicate_groups(images, repeats)
    folder = staging / "task"
    manifest_sha, counts = _write_task(folder, images, name, meta, size, classes)
    notes = [f"ignored {len(stray)} file(s) outside class folders, e.g. {stray[0]}"] if stray else []
    return _Prepared(name, folder, manifest_sha, counts, classes, bad, duplicates, top, notes, src)


def _default_name(src: Path) -> str:
    name = src.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _materialise(src: Path, extract_to: Path, settings: DataSettings) -> Path:
    """A folder holding the dataset: `src` itself (checked) or the safely extracted archive."""
    if src.is_dir():
        _check_folder(src)
        return src
    if not src.is_file():
        raise DatasetError(f"{src}: not a regular file or folder; pass a folder or a .zip/.tar/.tar.gz")
    lower = src.name.lower()
    limit = int(settings.max_extract_mb) * 2**20
    if lower.endswith(".zip"):
        _extract_zip(src, extract_to, limit)
    elif lower.endswith((".tar", ".tar.gz", ".tgz")):
        _extract_tar(src, extract_to, limit)
    else:
        raise DatasetError(
            f"{src}: not a folder or a supported archive (.zip, .tar, .tar.gz); pass a folder of "
            "class sub-folders or an archive of one"
        )
    return extract_to


def _check_folder(root: Path) -> None:
    """Reject folders holding symlinks (may point anywhere) or special files (a FIFO blocks reads)."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            mode = path.lstat().st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                problems.append(f"{rel} (symlink)")
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                problems.append(f"{rel} ({_special_kind(mode)})")
    if problems:
        raise DatasetError(
            f"{root}: contains {len(problems)} symlink(s) or special file(s): {_listing(problems)}; "
            "replace links by the real files and remove special files"
        )


def _special_kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _special_files(left_out: list[str], root: Path):  # noqa: ANN202 (shutil's ignore protocol)
    """A copytree `ignore` callable that leaves out devices/FIFOs/sockets and records them."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set()
        for name in names:
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                skipped.add(name)
                left_out.append(f"{Path(folder, name).relative_to(root).as_posix()} ({_special_kind(mode)})")
        return skipped

    return ignore


def _member_path_problem(name: str) -> str | None:
    """Why an archive member name would land outside the target folder (None when it is safe)."""
    norm = name.replace("\\", "/")
    if "\x00" in norm:
        return "NUL byte in the name"
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        return "absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "'..' in the path (would land outside the target folder)"
    return None


def _safe_target(root: Path, name: str) -> Path | None:
    """The extraction path of a member (None for the archive root entry such as './')."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return root.joinpath(*parts) if parts else None


def _reject_members(src: Path, problems: list[str], total: int, limit: int) -> None:
    if problems:
        raise DatasetError(
            f"{src}: unsafe archive, nothing was extracted: {_listing(problems)}; re-create the "
            "archive from a plain folder of regular files with relative paths"
        )
    if total > limit:
        raise DatasetError(
            f"{src}: the archive expands to {total / 2**20:.0f} MiB, above data.max_extract_mb="
            f"{limit // 2**20} in params.yaml (archive bomb?); split the dataset or raise the limit"
        )


def _extract_zip(src: Path, dest: Path, limit: int) -> None:
    """Check every member first, then extract regular files and folders only."""
    try:
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
            problems, total = [], 0
            for info in infos:
                mode = info.external_attr >> 16  # Unix mode bits, when the archiver stored them
                reason = _member_path_problem(info.filename)
                if reason is None and stat.S_ISLNK(mode):
                    reason = "symlink"
                elif reason is None and mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                    reason = _special_kind(mode)
                elif reason is None and info.flag_bits & 0x1:
                    reason = "encrypted"
                if reason:
                    problems.append(f"{info.filename} ({reason})")
                total += info.file_size
            _reject_members(src, problems, total, limit)
            budget = limit
            for info in infos:
                target = _safe_target(dest, info.filename)
                if target is None or info.is_dir():
                    (target or dest).mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as fin:
                    budget -= _copy_bounded(fin, target, budget, src)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
    ) as exc:
        raise DatasetError(
            f"{src}: not a readable zip archive ({type(exc).__name__}: {exc}); re-create the archive"
        ) from None


def _extract_tar(src: Path, dest: Path, limit: int) -> None:
    """Check every member first (no links, devices or escaping paths), then extract files and folders."""
    try:
        with tarfile.open(src, "r:*") as tf:
            members = tf.getmembers()
            problems, total = [], 0
            for m in members:
                reason = _member_path_problem(m.name)
                if reason is None and m.issym():
                    reason = f"symlink to {m.linkname}"
                elif reason is None and m.islnk():
                    reason = f"hard link to {m.linkname}"
                elif reason is None and (m.ischr() or m.isblk()):
                    reason = "device file"
                elif reason is None and m.isfifo():
                    reason = "FIFO"
                elif reason is None and not (m.isfile() or m.isdir()):
                    reason = "special member"
                if reason:
                    problems.append(f"{m.name} ({reason})")
                total += m.size if m.isfile() else 0
            _reject_members(src, problems, total, limit)
            budget = limit
            for m in members:
                target = _safe_target(dest, m.name)
                if target is None or m.isdir():
                    (target or dest).mkdir(parents=True, exist_ok=True)
                    continue
                fin = tf.extractfile(m)
                if fin is not None:
                    with fin:
                        budget -= _copy_bounded(fin, target, budget, src)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise DatasetError(
            f"{src}: not a readable tar archive ({type(exc).__name__}: {exc}); re-create the archive"
        ) from None


def _copy_bounded(fin: io.BufferedIOBase | Any, target: Path, budget: int, src: Path) -> int:
    """Copy a member stream to `target`, refusing to write more than `budget` bytes; return bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(target, "xb") as fout:  # "x": a repeated member name is an error, not an overwrite
        while chunk := fin.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise DatasetError(
                    f"{src}: the archive expands beyond data.max_extract_mb (its headers understate "
                    "the sizes: archive bomb?); re-create the archive"
                )
            fout.write(chunk)
    return written


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "._")) and path.name not in IGNORED_NAMES


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible sub-folders and files of `folder`, sorted by name."""
    entries = sorted((p for p in folder.iterdir() if _visible(p)), key=lambda p: p.name)
    return [p for p in entries if p.is_dir()], [p for p in entries if p.is_file()]


def _dataset_root(tree: Path) -> Path:
    """Look through single wrapper folders (``foo.zip`` → ``foo/<class>/…``)."""
    top = tree
    while True:
        dirs, files = _children(top)
        if len(dirs) != 1 or files or dirs[0].name in SPLITS:
            return top
        inner_dirs, _ = _children(dirs[0])
        if not inner_dirs:  # a single class folder: keep it visible as one class
            return top
        top = dirs[0]


def _read_task_yaml(top: Path) -> dict[str, Any]:
    """task.yaml beside the classes: {name?, description?, image_size?} (unknown keys refused)."""
    path = top / TASK_YAML
    if not path.is_file():
        return {}
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{TASK_YAML}: not valid YAML ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{TASK_YAML}: expected a mapping with keys {sorted(TASK_YAML_KEYS)}")
    unknown = sorted(set(meta) - TASK_YAML_KEYS)
    if unknown:
        raise DatasetError(f"{TASK_YAML}: unknown key(s) {unknown}; known keys: {sorted(TASK_YAML_KEYS)}")
    size = meta.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024):
        raise DatasetError(f"{TASK_YAML}: image_size={size!r} must be an integer from 8 to 1024")
    for key in ("name", "description"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DatasetError(f"{TASK_YAML}: {key} must be a string")
    return meta


def _layout(top: Path) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """Candidate files as (path relative to `top`, class, given split or None), and stray files.

    Raises DatasetError for an empty input, fewer than 2 classes, or split folders mixed with
    class folders.
    """
    dirs, top_files = _children(top)
    stray = [f.name for f in top_files if f.name != TASK_YAML]
    split_dirs = [d for d in dirs if d.name in SPLITS]
    if split_dirs:
        others = [d.name for d in dirs if d.name not in SPLITS]
        if others:
            raise DatasetError(
                f"{top}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}); put every class under train/ (and val/, test/) or "
                "use no split folders at all"
            )
        if not any(d.name == "train" for d in split_dirs):
            raise DatasetError(f"{top}: has {split_dirs[0].name}/ but no train/; add train/<class>/ folders")
        groups = []
        for split_dir in split_dirs:
            class_dirs, files = _children(split_dir)
            stray += [f"{split_dir.name}/{f.name}" for f in files]
            groups += [(d, split_dir.name) for d in class_dirs]
    else:
        groups = [(d, None) for d in dirs]
    candidates = [
        (path.relative_to(top).as_posix(), class_dir.name, split)
        for class_dir, split in groups
        for path in _files_under(class_dir)
    ]
    if not candidates:
        raise DatasetError(
            f"{top}: is empty (no files in class folders); expected <root>/<class>/<image> with "
            "PNG, JPEG, BMP or WebP images"
        )
    classes = sorted({c for _, c, _ in candidates})
    if len(classes) < 2:
        found = f"only class {classes[0]!r}"
        raise DatasetError(
            f"{top}: has {found}; a task needs at least 2 classes: add one sub-folder per class "
            "(<root>/<class>/<image>)"
        )
    return candidates, stray


def _files_under(folder: Path) -> list[Path]:
    """Visible files below `folder` at any depth, sorted, skipping hidden folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(Path(d)))
        out += [Path(dirpath) / f for f in sorted(filenames) if _visible(Path(f))]
    return out


# ------------------------------------------------------------------------------------------ images


def _load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Decode a PNG/JPEG/BMP/WebP file fully and return it as an upright RGB image.

    Raises _TooLarge above `max_pixels` (checked from the header, before decoding) and _BadImage
    for anything not decodable (fake, truncated, unsupported format).
    """
    with warnings.catch_warnings():
        # PIL's own bomb guard (Image.MAX_IMAGE_PIXELS) warns before it raises: make both errors.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                _check_pixels(im, max_pixels)
                im.verify()  # structure and checksums; the object is unusable afterwards
            with Image.open(path, formats=IMAGE_FORMATS) as im:
                im.load()  # full decode: catches truncated pixel data that verify() misses
                return _to_rgb(ImageOps.exif_transpose(im))
        except _TooLarge:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _TooLarge(str(exc)) from None
        except UnidentifiedImageError:
            raise _BadImage("not a PNG, JPEG, BMP or WebP image (fake or unsupported format)") from None
        except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, …
            raise _BadImage(f"unreadable or truncated ({type(exc).__name__}: {exc})") from None


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    width, height = im.size
    if width * height > max_pixels:
        raise _TooLarge(f"{width}×{height} = {width * height} pixels")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: alpha composited on white, 16/32-bit and float scaled to 8 bits."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = arr.max(initial=0.0)
        # The value range is not stored in the file: guess it from the data (0–1, 0–255 or 16 bits).
        full_scale = 1.0 if im.mode == "F" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
        im = Image.fromarray(np.clip(arr / full_scale * 255.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _encode_png(im: Image.Image, size: int) -> bytes:
    """RGB → `size`×`size` PNG bytes; deterministic (no timestamps or text chunks)."""
    resized = im.resize((size, size), Image.Resampling.LANCZOS) if im.size != (size, size) else im
    buf = io.BytesIO()
    resized.save(buf, format="PNG")
    return buf.getvalue()


def _normalise_all(
    top: Path, files: list[tuple[str, str, str | None]], settings: DataSettings, size: int, blobs: Path
) -> tuple[list[_Image], list[BadFile]]:
    """Decode every candidate; write each PNG once to ``blobs/<sha>.png``."""
    blobs.mkdir(parents=True, exist_ok=True)
    images, bad, too_large = [], [], []
    for rel, cls, split in files:
        try:
            png = _encode_png(_load_rgb(top / rel, int(settings.max_image_pixels)), size)
        except _BadImage as exc:
            bad.append(BadFile(rel, str(exc)))
            continue
        except _TooLarge as exc:
            too_large.append(f"{rel} ({exc})")
            continue
        sha = hashlib.sha256(png).hexdigest()
        blob = blobs / f"{sha}.png"
        if not blob.exists():
            blob.write_bytes(png)
        images.append(_Image(rel, cls, split, sha, blob))
    if too_large:
        raise DatasetError(
            f"{len(too_large)} image(s) above data.max_image_pixels={settings.max_image_pixels} "
            f"(decompression bomb?): {_listing(too_large)}; downscale them or raise "
            "data.max_image_pixels in params.yaml"
        )
    return images, bad


def _check_bad_fraction(bad: list[BadFile], total: int, settings: DataSettings) -> None:
    if bad and len(bad) / total > settings.max_bad_fraction:
        listed = [f"{b.path} ({b.reason})" for b in bad]
        raise DatasetError(
            f"{len(bad)} of {total} files ({len(bad) / total:.0%}) are unreadable, truncated or not "
            f"images, above data.max_bad_fraction={settings.max_bad_fraction}: {_listing(listed)}; "
            "replace or remove them"
        )


def _deduplicate(images: list[_Image]) -> tuple[list[_Image], list[tuple[_Image, _Image]]]:
    """Keep the first of identical images within one (class, given split).

    Returns (kept images, [(dropped repeat, the kept image it repeats)]).
    """
    kept: dict[tuple[str, str, str | None], _Image] = {}
    repeats = []
    for img in images:
        key = (img.sha256, img.cls, img.split)
        if key in kept:
            repeats.append((img, kept[key]))
        else:
            kept[key] = img
    return list(kept.values()), repeats


def _duplicate_groups(kept: list[_Image], repeats: list[tuple[_Image, _Image]]) -> list[DuplicateGroup]:
    """Every content hash seen more than once, with the splits the copies ended up in."""
    by_sha: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for img in kept:
        by_sha[img.sha256].append((img.source, img.cls, str(img.split)))
    for dropped, original in repeats:
        by_sha[dropped.sha256].append((dropped.source, dropped.cls, str(original.split)))
    return [
        DuplicateGroup(
            sha,
            tuple(sorted(src for src, _, _ in group)),
            tuple(sorted({cls for _, cls, _ in group})),
            tuple(sorted({split for _, _, split in group})),
        )
        for sha, group in sorted(by_sha.items())
        if len(group) > 1
    ]


def _check_classes(
    images: list[_Image], files: list[tuple[str, str, str | None]], settings: DataSettings
) -> list[str]:
    """Every class (folder) needs min_images_per_class usable images; returns the sorted classes."""
    classes = sorted({cls for _, cls, _ in files})
    counts = Counter(img.cls for img in images)
    low = [f"{c!r} has {counts[c]}" for c in classes if counts[c] < settings.min_images_per_class]
    if low:
        raise DatasetError(
            f"class(es) below data.min_images_per_class={settings.min_images_per_class} usable "
            f"images: {_listing(low)}; add images to them (or lower the limit in params.yaml)"
        )
    return classes


def _assign_splits(images: list[_Image], settings: DataSettings, seed: int) -> None:
    """Fill in missing splits (in place): all of them, or val/test carved from a given train."""
    given = {img.split for img in images}
    if given == {None}:
        pool, wanted = images, {"val": settings.val_fraction, "test": settings.test_fraction}
    else:
        missing = {"val", "test"} - given
        pool = [img for img in images if img.split == "train"]
        fractions = {"val": settings.val_fraction, "test": settings.test_fraction}
        wanted = {s: fractions[s] for s in missing}
        if not wanted:
            return
    # Order by content, not by file name or walk order: same content + seed → same split.
    pool = sorted(pool, key=lambda i: (i.cls, i.sha256, i.source))
    labels = [img.cls for img in pool]
    assigned = stratified_split(labels, wanted.get("val", 0.0), wanted.get("test", 0.0), seed)
    for img, split in zip(pool, assigned, strict=True):
        # stratified_split gives every split ≥ 1 sample per class; a split the user gave is not re-made.
        img.split = split if split == "train" or split in wanted else "train"


def _write_task(
    folder: Path, images: list[_Image], task: str, meta: dict[str, Any], size: int, classes: list[str]
) -> tuple[str, dict[str, int]]:
    """Lay out ``<split>/<class>/<sha>.png``, manifest.csv and task.yaml; return (manifest sha, counts)."""
    rows = []
    for img in images:
        rel = f"{img.split}/{img.cls}/{img.sha256}.png"
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(img.blob, target)
        rows.append((rel, img.cls, img.split, img.sha256))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path", ignore_index=True)
    manifest.to_csv(folder / MANIFEST, index=False, lineterminator="\n")
    counts = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    info = {
        "name": task,
        "description": meta.get("description") or "",
        "image_size": size,
        "classes": classes,
        "num_images": counts,
    }
    (folder / TASK_YAML).write_text(yaml.safe_dump(info, sort_keys=False, allow_unicode=True))
    return file_sha256(folder / MANIFEST), counts


def file_sha256(path: Path) -> str:
    """sha256 (64 hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(task_dir: Path) -> pd.DataFrame:
    """``manifest.csv`` of a task folder as a DataFrame with columns path, class, split, sha256."""
    return pd.read_csv(task_dir / MANIFEST, dtype=str, keep_default_na=False)


# ----------------------------------------------------------------------------------------- publish


def _publish(prep: _Prepared, params: dict[str, Any]) -> IngestResult:
    """Under the project lock: compare with what is there, swap the task folder in, commit, push."""
    result = IngestResult(
        task=prep.task,
        status="new",
        task_dir=tasks_dir(params) / prep.task,
        manifest_sha256=prep.manifest_sha256,
        n_images=prep.n_images,
        classes=prep.classes,
        skipped=prep.skipped,
        duplicates=prep.duplicates,
        warnings=list(prep.warnings),
    )
    with locked(params):
        ensure_project_repo(project_root(params), params)  # re-entrant lock: same object
        assert_data_in_sync(params)
        holder = _task_with_manifest(params, prep.manifest_sha256, prefer=prep.task)
        if holder is not None:
            result.status, result.duplicate_of = "unchanged", holder
            result.task_dir = tasks_dir(params) / holder
            result.data_version = _version_of(params, holder, prep.manifest_sha256)
            return result
        dest = result.task_dir
        if dest.exists():
            result.status = "new-version"
            versions = list_versions(params, prep.task)
            result.previous_version = versions[0] if versions else None
        result.data_version = _swap_in_and_commit(params, prep, dest)
        problem = push_data(params)
        if problem:
            result.warnings.append(problem)
    if prep.skipped:
        note = (
            f"{len(prep.skipped)} unreadable, truncated or fake file(s) skipped while ingesting {prep.task}"
        )
        result.skipped_quarantine = quarantine(
            params,
            prep.dataset_root,
            note,
            files=prep.skipped,
            name=f"{prep.task}-skipped",
            origin=prep.source,
        )
    return result


def _task_with_manifest(params: dict[str, Any], sha: str, prefer: str) -> str | None:
    """The task whose current manifest has hash `sha` (`prefer` first), or None."""
    root = tasks_dir(params)
    candidates = [root / prefer] + sorted(p for p in root.iterdir() if p.is_dir() and p.name != prefer)
    for folder in candidates:
        manifest = folder / MANIFEST
        if manifest.is_file() and file_sha256(manifest) == sha:
            return folder.name
    return None


def _version_of(params: dict[str, Any], task: str, sha: str) -> DataVersion:
    """The first ingest that recorded this content for `task`, else HEAD's version of it."""
    matching = [v for v in list_versions(params, task) if v.manifest_sha256 == sha]
    return matching[-1] if matching else current_version(params, task, sha)


def _swap_in_and_commit(params: dict[str, Any], prep: _Prepared, dest: Path) -> DataVersion:
    """Replace `dest` with the prepared folder and commit; on failure put the old folder back."""
    old = prep.folder.parent / "previous"
    if dest.exists():
        os.replace(dest, old)  # same file system (staging is in the project): atomic
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(prep.folder, dest)
    try:
        return commit_data_version(params, prep.task, prep.manifest_sha256, push=False)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        if old.exists():
            os.replace(old, dest)
        raise


def _in_inbox(params: dict[str, Any], src: Path) -> bool:
    inbox = resolve_path(params, data_settings(params).inbox).resolve()
    try:
        return src.resolve().is_relative_to(inbox) and src.resolve() != inbox
    except OSError:
        return False


def _listing(items: list[str]) -> str:
    """'a, b, c' with at most MAX_LISTED items and '… and N more'."""
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", … and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")
