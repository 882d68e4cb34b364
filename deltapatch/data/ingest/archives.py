"""Safe materialisation of an input: a checked folder, or an archive extracted without surprises.

Hostile or malformed containers reject the whole input before anything is extracted: members with
``..`` or absolute paths, symlinks, hard links, device files and FIFOs, encrypted members, more than
``data.max_extract_mb`` uncompressed (also when the headers understate it), more than
``data.max_extract_members`` members. Folders holding symlinks or special files are rejected the same way.

Tar archives (plain or compressed) are read as a stream, one member header at a time, and both limits
are checked as it goes: a bomb is refused at the first header past a limit, and the decompressed bytes
themselves are counted too (extended headers, which tarfile reads into memory, included) — never after
decompressing the whole archive. The check pass and the extraction pass each read the stream once.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, cast

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
    members = int(settings.max_extract_members)
    if lower.endswith(".zip"):
        _extract_zip(src, extract_to, limit, members)
    elif lower.endswith((".tar", ".tar.gz", ".tgz")):
        _extract_tar(src, extract_to, limit, members)
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


def _too_many_members(src: Path, count: str, max_members: int) -> DatasetError:
    return DatasetError(
        f"{src}: the archive holds {count} members, above data.max_extract_members={max_members} in "
        "params.yaml (archive bomb?), nothing was extracted; split the dataset or raise the limit"
    )


def _extract_zip(src: Path, dest: Path, limit: int, max_members: int) -> None:
    """Check every member first, then extract regular files and folders only."""
    try:
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:  # the central directory's count, known before anything is read
                raise _too_many_members(src, str(len(infos)), max_members)
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


def _extract_tar(src: Path, dest: Path, limit: int, max_members: int) -> None:
    """Check every member first (no links, devices or escaping paths), then extract files and folders.

    Two streaming passes (see :func:`_tar_members`): the first only checks, so an unsafe archive is
    refused with every bad member listed and nothing extracted; the second extracts.
    """
    try:
        problems = []
        for _, m in _tar_members(src, limit, max_members):
            reason = _tar_member_problem(m)
            if reason:
                problems.append(f"{m.name} ({reason})")
        _reject_members(src, problems, 0, limit)  # the sizes were checked while streaming
        budget = limit
        for tf, m in _tar_members(src, limit, max_members):
            reason = _tar_member_problem(m)
            if reason:  # the file changed between the passes
                raise DatasetError(f"{src}: unsafe archive: {m.name} ({reason}); the archive changed while "
                                   "it was read, re-create it")
            target = _safe_target(dest, m.name)
            if target is None or m.isdir():
                (target or dest).mkdir(parents=True, exist_ok=True)
                continue
            fin = tf.extractfile(m)
            if fin is not None:
                with fin:
                    budget -= _copy_bounded(fin, target, budget, src)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise DatasetError(
            f"{src}: not a readable tar archive ({type(exc).__name__}: {exc}); re-create the archive"
        ) from None


def _tar_member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a tar member may not be extracted (None when it is a safe file or folder)."""
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
    return reason


# Decompressed bytes a tar stream may hold beyond its members' data: a header block, padding to the
# next 512-byte block and room for an extended (pax/GNU long name) header, per member read so far,
# plus the end-of-archive blocks and record padding.
TAR_BYTES_PER_MEMBER = 8 * 1024
TAR_BYTES_SLACK = 64 * 1024
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))


@contextmanager
def _decompressed(src: Path) -> Iterator[Any]:
    """`src` as an uncompressed tar stream (gzip, bzip2 and xz recognised by their magic bytes)."""
    with open(src, "rb") as raw:
        head = raw.read(6)
    opener: Any = next((op for magic, op in _MAGIC if head.startswith(magic)), None)
    with (opener(src, "rb") if opener else open(src, "rb")) as stream:
        yield stream


class _CountedStream:
    """Reads a decompressed stream in bounded chunks, refusing more than `cap()` bytes in all."""

    def __init__(self, stream: Any, src: Path, limit: int, members: list[int]) -> None:
        self.stream, self.src, self.limit, self.members = stream, src, limit, members
        self.read_bytes = 0

    def cap(self) -> int:
        return self.limit + (self.members[0] + 1) * TAR_BYTES_PER_MEMBER + TAR_BYTES_SLACK

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else min(size, 1 << 20)  # never one huge read
        data = self.stream.read(size)
        self.read_bytes += len(data)
        if self.read_bytes > self.cap():
            raise DatasetError(
                f"{self.src}: the archive decompresses to more than {self.cap() / 2**20:.1f} MiB "
                f"(data.max_extract_mb={self.limit // 2**20} in params.yaml plus tar headers; archive bomb?), "
                "refused while reading it, nothing was extracted; split the dataset or raise the limit"
            )
        return data


def _tar_members(src: Path, limit: int, max_members: int) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The members of a tar archive, read as a stream (mode ``r|``: one header at a time, no seeking).

    Refused as soon as a limit is passed, before reading on: more than `max_members` members, more than
    `limit` bytes of member data declared by the headers so far, or more decompressed bytes than that
    data plus its headers (:class:`_CountedStream`).
    """
    count = [0]
    declared = 0
    with _decompressed(src) as stream:
        counted = _CountedStream(stream, src, limit, count)
        # stream mode needs read() only (typeshed's protocol also lists tell/seek/close)
        with tarfile.open(fileobj=cast(Any, counted), mode="r|") as tf:
            for m in tf:
                count[0] += 1
                if count[0] > max_members:
                    raise _too_many_members(src, f"more than {max_members}", max_members)
                declared += m.size if m.isfile() else 0
                if declared > limit:
                    raise DatasetError(
                        f"{src}: the archive expands to at least {declared / 2**20:.0f} MiB, above "
                        f"data.max_extract_mb={limit // 2**20} in params.yaml (archive bomb?), refused at "
                        f"member {m.name} before reading on; split the dataset or raise the limit"
                    )
                yield tf, m


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


