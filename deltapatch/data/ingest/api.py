"""The public ingestion API: :func:`ingest` (prepare in staging, then publish under the project lock)
and :func:`quarantine`. The rules are specified in docs/ingestion.md."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from deltapatch.config import project_root, resolve_path, state_dir
from deltapatch.data.ingest.archives import materialise, special_files
from deltapatch.data.ingest.layout import (
    assign_splits,
    check_bad_fraction,
    check_classes,
    dataset_root,
    deduplicate,
    duplicate_groups,
    file_sha256,
    find_images,
    normalise_all,
    read_task_yaml,
    write_task,
)
from deltapatch.data.ingest.model import (
    ARCHIVE_SUFFIXES,
    MANIFEST,
    BadFile,
    IngestResult,
    PreparedTask,
    RejectedInput,
)
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
from deltapatch.task_names import validate_task_name

# -------------------------------------------------------------------------------------- public API


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
        shutil.copytree(src, dest / src.name, symlinks=True, ignore=special_files(left_out, src))
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
) -> PreparedTask:
    """Validate and normalise `src` into ``staging/task`` (nothing in the project changes)."""
    if task is not None:
        validate_task_name(task)
    tree = materialise(src, staging / "extract", settings)
    top = dataset_root(tree)
    meta = read_task_yaml(top)
    name = validate_task_name(task or meta.get("name") or _default_name(src))
    size = int(meta.get("image_size") or settings.image_size)
    files, stray = find_images(top)
    images, bad = normalise_all(top, files, settings, size, staging / "blobs")
    check_bad_fraction(bad, len(files), settings)
    images, repeats = deduplicate(images)
    classes = check_classes(images, files, settings)
    assign_splits(images, settings, int(params.get("seed", 0)))
    duplicates = duplicate_groups(images, repeats)
    folder = staging / "task"
    manifest_sha, counts = write_task(folder, images, name, meta, size, classes)
    notes = [f"ignored {len(stray)} file(s) outside class folders, e.g. {stray[0]}"] if stray else []
    return PreparedTask(name, folder, manifest_sha, counts, classes, bad, duplicates, top, notes, src)


def _default_name(src: Path) -> str:
    name = src.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name



# ----------------------------------------------------------------------------------------- publish


def _publish(prep: PreparedTask, params: dict[str, Any]) -> IngestResult:
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


def _swap_in_and_commit(params: dict[str, Any], prep: PreparedTask, dest: Path) -> DataVersion:
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


