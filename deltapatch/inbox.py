"""The inbox: `submit` drops a dataset into it and announces it; `watch` announces what others drop.

The announcement is the Prefect event ``deltapatch.task.arrived`` with resource
``{"prefect.resource.id": "deltapatch.task.<name>", "deltapatch.task.name": "<name or ''>"}`` and
payload ``{"path": "<absolute path in the inbox>"}``; the `patch-task` deployment's trigger turns
each one into a flow run.

Completeness: a folder counts as complete once its listing (names, sizes, mtimes) has not changed for
``stable_seconds``; an archive once its size and mtime have not. Names starting with ``.`` or ending
in ``.part``/``.tmp``/``.crdownload`` are ignored (submit copies under a hidden name, then renames).
What was announced is remembered in ``.deltapatch/inbox-emitted.json`` (name + content signature),
so a restarted watcher does not announce it again, and a dataset submitted with `submit` is not
announced a second time by the watcher.

Names: the task name is ``--task`` or the submitted folder/archive's own name. When that name is
already in the inbox (an earlier arrival still running), `submit` puts the copy under its own name in
a hidden per-arrival folder, ``inbox/.arrival-<time>-<id>/<name>``, so the copy keeps the user's name.
A dataset leaves the inbox when its run has ended (:func:`release`): once its data is versioned, or
by being quarantined.
"""

from __future__ import annotations

import contextlib
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
    """Copy the dataset at `path` into the inbox (atomically) and emit the arrival event."""
    api_url = api_url_for(params) if announce else ""  # before copying: no server, nothing left behind
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise DatasetError(f"{src}: no such file or folder; pass a folder of class sub-folders or an archive of one")
    if task is not None:
        validate_task_name(task)
    inbox = inbox_dir(params)
    name = src.name
    dest = inbox / name
    if dest.exists() or src == dest:  # keep the user's name: a folder of its own for this arrival
        dest = inbox / f"{ARRIVAL_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}" / name
    entry = _inbox_entry(inbox, dest)
    hidden = inbox / f".incoming-{uuid.uuid4().hex}{name[len(default_task_name(src)):]}"
    if src.is_dir():
        shutil.copytree(src, hidden, symlinks=True)
    else:
        shutil.copy2(src, hidden)
    with _emitted(params) as emitted:
        dest.parent.mkdir(exist_ok=True)
        os.replace(hidden, dest)
        emitted[entry.name] = {"signature": signature(entry), "task": task, "by": "submit", "at": time.time()}
    try:
        event_id = emit_arrival(api_url, dest, task) if announce else ""
    except BaseException:
        release(params, dest)  # not announced: take the copy back out (the user's original is untouched)
        raise
    return {"path": str(dest), "task": task or default_task_name(src), "event_id": event_id}


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
    Returns True when something was removed."""
    inbox = inbox_dir(params).resolve()
    path = Path(path).resolve()
    if not in_inbox(params, path):
        return False
    entry = _inbox_entry(inbox, path)
    removed = entry.exists()
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    elif removed:
        entry.unlink(missing_ok=True)
    with _emitted(params) as emitted:
        emitted.pop(entry.name, None)
    return removed


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
            # so the next scan tries again.
            with _emitted(self.params) as emitted:
                if emitted.get(name, {}).get("signature") == sig:
                    continue
                emitted[name] = {"signature": sig, "task": None, "by": "watch", "at": time.time()}
            try:
                self.emit(path, None)
            except Exception:
                with _emitted(self.params) as emitted:
                    emitted.pop(name, None)
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
