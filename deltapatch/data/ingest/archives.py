"""Safe materialisation of an input: a checked folder, or an archive extracted without surprises.

Hostile or malformed containers reject the whole input before anything is extracted: members with
``..`` or absolute paths, symlinks, hard links, device files and FIFOs, encrypted members, more than
``data.max_extract_mb`` uncompressed (also when the headers understate it). Folders holding symlinks
or special files are rejected the same way.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from deltapatch.data.ingest.model import listing
from deltapatch.data.versioning import DataSettings
from deltapatch.errors import DatasetError


def materialise(src: Path, extract_to: Path, settings: DataSettings) -> Path:
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
            f"{root}: contains {len(problems)} symlink(s) or special file(s): {listing(problems)}; "
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


def special_files(left_out: list[str], root: Path):  # noqa: ANN202 (shutil's ignore protocol)
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
            f"{src}: unsafe archive, nothing was extracted: {listing(problems)}; re-create the "
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


