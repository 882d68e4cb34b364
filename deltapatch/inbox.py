"""The inbox: `submit` drops a dataset into it and announces it; `watch` announces what others drop.

The announcement is the Prefect event ``deltapatch.task.arrived`` with resource
``{"prefect.resource.id": "deltapatch.task.<name>", "deltapatch.task.name": "<name or ''>"}`` and
payload ``{"path": "<absolute path in the inbox>"}``; the `patch-task` deployment's trigger turns
each one into a flow run.

Completeness: a folder counts as complete once its listing (names, sizes, mtimes) has not changed for
``stable_seconds``; an archive once its size and mtime have not. Names starting with ``.`` or ending
in ``.part``/``.tmp``/``.crdownload`` are ignored (submit copies under a hidden name, then renames).
What was announced is remembered in ``.deltapatch/inbox-emitted.json`` (per inbox entry: the claim
of each announced arrival whose run has not ended — content signature, plus an identity of the exact
files: inode numbers, sizes, mtimes and ctimes), so a restarted watcher does not announce it again,
and a dataset submitted with `submit` is not announced a second time by the watcher.

Names: the task name is ``--task`` or the submitted folder/archive's own name. When that name is
already in the inbox (an earlier arrival still running), `submit` puts the copy under its own name in
a hidden per-arrival folder, ``inbox/.arrival-<time>-<id>/<name>``, so the copy keeps the user's name.
The name is taken without ever replacing anything (a reserved folder / a hard link under the lock):
two concurrent submits of one name both arrive, and a failed submit leaves no hidden copy behind.

A dataset leaves the inbox when its run has ended (:func:`release`): once its data is versioned, or
by being quarantined. Only what the run claimed leaves: when the entry under that name is now a
different dataset (dropped there while the run trained, e.g. a corrected one after a rejection), it
stays, with its own announcement (or, when nobody announced it yet, the watcher announces it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from deltapatch import prefect_api
from deltapatch.config import resolve_path, state_dir
from deltapatch.errors import DatasetError, DeltapatchError
from deltapatch.prefect_api import api_url_for
from deltapatch.task_names import validate_task_name

ARRIVED_EVENT = "deltapatch.task.arrived"
TASK_RESOURCE_PREFIX = "deltapatch.task."  # + task name: the event's resource id
TASK_NAME_LABEL = "deltapatch.task.name"  # the name given to `submit --task` ("" when none)
PATCH_TASK_DEPLOYMENT = "patch-task/patch-task"
EMIT_ATTEMPTS = 3
CONFIRM_SECONDS = 30.0
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial")
EMITTED_FILE = "inbox-emitted.json"
ARRIVAL_PREFIX = ".arrival-"  # hidden per-arrival folder of a submit whose name is taken
RELEASED_PREFIX = ".released-"  # hidden name of an entry being taken out of the inbox


def inbox_dir(params: dict[str, Any]) -> Path:
    inbox = params.get("data", {}).get("inbox", "inbox")
    path = resolve_path(params, inbox)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_task_name(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _ignored(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower().endswith(PARTIAL_SUFFIXES) or path.name == "__MACOSX"


def signature(path: Path) -> str:
    """What changes while a dataset is being written: sizes and mtimes of everything in it."""
    if path.is_file():
        st = path.stat()
        return f"f:{st.st_size}:{st.st_mtime_ns}"
    count = size = newest = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            count += 1
            size += st.st_size
            newest = max(newest, st.st_mtime_ns)
    return f"d:{count}:{size}:{newest}"


def identity(path: Path) -> str:
    """Which dataset this is, not only what it looks like: the inode numbers, sizes, mtimes and
    ctimes of everything under `path` (a new copy, even of the same files, has new ctimes). Reading a
    dataset, or renaming its top entry, keeps it; replacing it or changing any file does not."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return f"f:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            try:
                s = os.lstat(full)
            except OSError:
                continue
            rel = os.path.relpath(full, path)
            digest.update(f"{rel}\0{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}\0".encode())
    return f"d:{st.st_ino}:{digest.hexdigest()[:32]}"


# ---------------------------------------------------------------------------------- emitted state


@contextlib.contextmanager
def _emitted(params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    path = state_dir(params) / EMITTED_FILE
    with FileLock(str(path) + ".lock", timeout=60):
        data = json.loads(path.read_text()) if path.is_file() else {}
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


# An entry's record is its newest claim, with the older claims still outstanding under "earlier"
# (an entry replaced, or changed, while the run of its first announcement trained).


def _claims(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The outstanding claims of an entry, oldest first."""
    if not record:
        return []
    latest = {k: v for k, v in record.items() if k != "earlier"}
    return [*record.get("earlier", []), latest]


def _set_claims(emitted: dict[str, Any], name: str, claims: list[dict[str, Any]]) -> None:
    if not claims:
        emitted.pop(name, None)
        return
    emitted[name] = {**claims[-1], **({"earlier": claims[:-1]} if len(claims) > 1 else {})}


def _claimed(claim: dict[str, Any], path: Path, here: str | None) -> bool:
    """Whether `claim` is the dataset at `path` (identity `here`; None: nothing there)."""
    if here is None:
        return False
    if "identity" in claim:
        return bool(claim["identity"] == here)
    try:  # a claim recorded before identities were
        return bool(claim.get("signature") == signature(path))
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- events


def _event_resource(task: str | None, path: Path) -> dict[str, str]:
    name = task or default_task_name(path)
    return {"prefect.resource.id": f"{TASK_RESOURCE_PREFIX}{name}", "prefect.resource.name": name,
            TASK_NAME_LABEL: task or ""}


def emit_arrival(api_url: str, path: Path, task: str | None = None) -> str:
    """Announce `path` to the Prefect API at `api_url` and confirm the trigger started a run for it.

    An accepted event can still start no run (the trigger's action fails, e.g. on a SQLite server
    busy with ``database is locked``), so an arrival with no `patch-task` run after
    ``CONFIRM_SECONDS`` is announced again, up to ``EMIT_ATTEMPTS`` times. Returns the id of the
    event that started the run.
    """
    deployment = prefect_api.deployment_id(api_url, PATCH_TASK_DEPLOYMENT)
    for _ in range(EMIT_ATTEMPTS):
        event_id = prefect_api.send_event(api_url, ARRIVED_EVENT, _event_resource(task, path), {"path": str(path)})
        if prefect_api.wait_for_run(api_url, deployment, str(path), CONFIRM_SECONDS) is not None:
            return event_id
    raise DeltapatchError(
        f"announced {path} {EMIT_ATTEMPTS} times to {api_url} but no '{PATCH_TASK_DEPLOYMENT}' run started; "
        "check that the deployments are served (`deltapatch stack status`) and see .deltapatch/stack/logs/prefect.log"
    )


# ------------------------------------------------------------------------------------------ submit


def submit(params: dict[str, Any], path: str | os.PathLike[str], task: str | None = None,
           announce: bool = True) -> dict[str, Any]:
    """Copy the dataset at `path` into the inbox (atomically) and emit the arrival event.

    The copy is made under a hidden name, then moved to ``inbox/<name>`` — or, when that name is
    taken, to a fresh per-arrival folder — under the lock of the emitted state, with no-replace
    moves only: a concurrent submit of the same name, or a dataset dropped there by hand, is never
    replaced. A failed submit removes its hidden copy."""
    api_url = api_url_for(params) if announce else ""  # before copying: no server, nothing left behind
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise DatasetError(f"{src}: no such file or folder; pass a folder of class sub-folders or an archive of one")
    if task is not None:
        validate_task_name(task)
    inbox = inbox_dir(params)
    name = src.name
    hidden = inbox / f".incoming-{uuid.uuid4().hex}{name[len(default_task_name(src)):]}"
    try:
        if src.is_dir():
            shutil.copytree(src, hidden, symlinks=True)
        else:
            shutil.copy2(src, hidden)
        with _emitted(params) as emitted:
            dest = _place(inbox, hidden, name, name_free=src != inbox / name)
            entry = _inbox_entry(inbox, dest)
            claim = {"signature": signature(entry), "identity": identity(entry), "task": task, "by": "submit",
                     "at": time.time()}
            _set_claims(emitted, entry.name, [*_claims(emitted.get(entry.name)), claim])
    except BaseException:
        _discard(hidden)  # whatever went wrong, no hidden copy stays behind
        raise
    try:
        event_id = emit_arrival(api_url, dest, task) if announce else ""
    except BaseException:
        _take_back(params, entry, claim)  # not announced: take the copy back out (the user's original is untouched)
        raise
    return {"path": str(dest), "task": task or default_task_name(src), "event_id": event_id}


def _place(inbox: Path, hidden: Path, name: str, name_free: bool = True) -> Path:
    """Move the finished copy `hidden` to ``inbox/<name>`` when that name is free, else into a fresh
    per-arrival folder; never replaces anything. Returns where it went."""
    if name_free and _move_no_replace(hidden, inbox / name):
        return inbox / name
    while True:
        folder = inbox / f"{ARRIVAL_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            folder.mkdir()  # reserved: this arrival's own folder
        except FileExistsError:
            continue
        try:
            os.rename(hidden, folder / name)  # nothing there to replace
        except BaseException:
            with contextlib.suppress(OSError):
                folder.rmdir()
            raise
        return folder / name


def _move_no_replace(src: Path, dest: Path) -> bool:
    """Rename `src` to `dest` unless something is (or meanwhile appears) there; False when taken."""
    if src.is_dir() and not src.is_symlink():
        try:
            dest.mkdir()  # reserve the name: fails when it is taken
        except FileExistsError:
            return False
        try:
            os.rename(src, dest)  # onto our own empty reservation
        except OSError as exc:
            with contextlib.suppress(OSError):
                dest.rmdir()  # still ours only while empty
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):  # filled by hand meanwhile: theirs
                return False
            raise
        return True
    try:
        os.link(src, dest, follow_symlinks=False)  # fails when the name is taken
    except FileExistsError:
        return False
    except OSError as exc:  # a file system without hard links: reserve the name with an empty file
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
            os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(src, dest)  # onto our own placeholder
        return True
    src.unlink()
    return True


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _take_back(params: dict[str, Any], entry: Path, claim: dict[str, Any]) -> None:
    """Undo a submit whose announcement failed: its own claim, and its copy if that is still there."""
    with _emitted(params) as emitted:
        claims = _claims(emitted.get(entry.name))
        _set_claims(emitted, entry.name, [c for c in claims if c != claim])
        try:
            ours = identity(entry) == claim["identity"]
        except OSError:
            ours = False
        if ours:
            held = entry.with_name(f"{RELEASED_PREFIX}{uuid.uuid4().hex}")
            os.rename(entry, held)
    if ours:
        _discard(held)


def _inbox_entry(inbox: Path, path: Path) -> Path:
    """The top-level inbox entry holding `path` (its per-arrival folder, or `path` itself)."""
    return path.parent if path.parent != inbox and path.parent.name.startswith(ARRIVAL_PREFIX) else path


def in_inbox(params: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    inbox = inbox_dir(params).resolve()
    resolved = Path(path).resolve()
    return resolved != inbox and resolved.is_relative_to(inbox)


def release(params: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """Take a dataset whose run has ended out of the inbox (its data is versioned, or it was
    quarantined already); forget its announcement. A path outside the inbox is never touched.

    Only what a run claimed leaves, by identity (:func:`identity`, recorded with the announcement):
    when an outstanding claim on this entry is of a dataset no longer there (replaced, changed or
    quarantined while its run trained), that claim is the run that ended — it is retired and the
    entry now there stays, with its own claim (or none yet: the watcher announces it). Otherwise the
    entry is the one claimed (or one nobody announced) and is removed. Each call retires one claim,
    so two runs of one name end with both claims retired, whichever ends first.
    Returns True when something was removed."""
    inbox = inbox_dir(params).resolve()
    path = Path(path).resolve()
    if not in_inbox(params, path):
        return False
    entry = _inbox_entry(inbox, path)
    with _emitted(params) as emitted:
        claims = _claims(emitted.get(entry.name))
        held: Path | None = inbox / f"{RELEASED_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(entry, str(held))  # out of its name first: what is checked is what gets removed
        except FileNotFoundError:
            held = None
        here = identity(held) if held is not None else None
        ended = next((c for c in claims if held is None or not _claimed(c, held, here)), None)
        if ended is not None:  # that run's dataset is gone; the entry here (if any) is another arrival
            _set_claims(emitted, entry.name, [c for c in claims if c is not ended])
            if held is not None:
                back = _place(inbox, held, entry.name)
                if back != entry:  # the name was taken by hand meanwhile: the claims move with it
                    _set_claims(emitted, back.parent.name, _claims(emitted.pop(entry.name, None)))
            return False
        emitted.pop(entry.name, None)
    if held is None:
        return False
    _discard(held)
    return True


# ------------------------------------------------------------------------------------------- watch


class InboxWatcher:
    """Poll the inbox; emit once per complete, not yet announced dataset."""

    def __init__(self, params: dict[str, Any], stable_seconds: float = 2.0,
                 emit: Callable[[Path, str | None], Any] | None = None) -> None:
        self.params = params
        self.inbox = inbox_dir(params)
        self.stable_seconds = stable_seconds
        self.emit = emit or self._emit_to_project_server
        self._seen: dict[str, tuple[str, float]] = {}  # name → (signature, first seen with it)

    def _emit_to_project_server(self, path: Path, task: str | None) -> str:
        return emit_arrival(api_url_for(self.params), path, task)

    def poll(self) -> list[Path]:
        """One scan; returns the paths announced in it."""
        now = time.monotonic()
        announced = []
        entries = {p.name: p for p in sorted(self.inbox.iterdir()) if not _ignored(p)}
        for gone in set(self._seen) - set(entries):
            del self._seen[gone]
        for name, path in entries.items():
            try:
                sig = signature(path)
            except OSError:
                continue
            previous = self._seen.get(name)
            if previous is None or previous[0] != sig:
                self._seen[name] = (sig, now)
                continue
            if now - previous[1] < self.stable_seconds:
                continue
            # Claim under the lock, announce outside it: confirming a run can take a while, and
            # `submit` must not wait on the lock meanwhile. A failed announcement drops the claim,
            # so the next scan tries again. The claims of earlier arrivals under this name whose runs
            # have not ended stay (see `release`).
            with _emitted(self.params) as emitted:
                claims = _claims(emitted.get(name))
                if any(c.get("signature") == sig for c in claims):
                    continue
                try:
                    claim = {"signature": sig, "identity": identity(path), "task": None, "by": "watch",
                             "at": time.time()}
                except OSError:
                    continue
                _set_claims(emitted, name, [*claims, claim])
            try:
                self.emit(path, None)
            except Exception:
                with _emitted(self.params) as emitted:
                    _set_claims(emitted, name, [c for c in _claims(emitted.get(name)) if c != claim])
                raise
            announced.append(path)
        return announced

    def run(self, interval: float = 1.0, heartbeat: Path | None = None,
            on_announce: Callable[[Path], None] | None = None, stop: Callable[[], bool] | None = None) -> None:
        while not (stop and stop()):
            for path in self.poll():
                if on_announce:
                    on_announce(path)
            if heartbeat is not None:
                heartbeat.parent.mkdir(parents=True, exist_ok=True)
                heartbeat.touch()
            time.sleep(interval)
