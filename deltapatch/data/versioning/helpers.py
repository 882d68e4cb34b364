"""Running git, opening the DVC repository quietly, and the project-wide data lock.

DVC is imported inside the functions that use it (here and in the sibling modules): importing
``dvc`` runs ``dvc.logger.setup()``, which adds console handlers to the ``dvc`` loggers, sets the
``asyncio`` and ``aiohttp`` loggers to CRITICAL and wraps ``sys.stdout`` (``colorama.init()``).
Most importers of this package only need its paths and settings (the gate and the task sources,
hence training, the bench, the stream and serving); they never run a DVC operation and keep their
logging and streams as they were.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from deltapatch.config import state_dir
from deltapatch.data.versioning.settings import LOCK_NAME, LOCK_TIMEOUT_S, VersioningError
from deltapatch.telemetry import disable_telemetry

# ------------------------------------------------------------------------------------------ helpers


def git(root: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    """Run ``git <args>`` in `root`; return stdout. Failures become a VersioningError naming the call."""
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, input=input, check=False)
    if check and proc.returncode != 0:
        raise VersioningError(
            f"`git {' '.join(args)}` failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


@contextlib.contextmanager
def _dvc_repo(root: Path) -> Iterator[Any]:
    """Open the DVC repo at `root` with DVC's own console output silenced (we report ourselves)."""
    from dvc.repo import Repo  # lazy: dvc's import reconfigures logging (module docstring)

    with _dvc_quiet(), Repo(os.fspath(root)) as repo:
        yield repo


def _dvc_error(action: str, exc: Exception) -> VersioningError:
    return VersioningError(f"DVC could not {action}: {type(exc).__name__}: {exc}")


def data_lock(params: dict[str, Any]) -> FileLock:
    """The project-wide lock serialising every change to ``data/``, ``data.dvc`` and the git index.

    `is_singleton` makes it re-entrant inside one process (the same object per path), so an ingest
    holding it can call :func:`commit_data_version`, which takes it again.
    """
    path = state_dir(params) / LOCK_NAME
    return FileLock(path, timeout=LOCK_TIMEOUT_S, is_singleton=True)


@contextlib.contextmanager
def locked(params: dict[str, Any]) -> Iterator[None]:
    """``with locked(params):`` – hold :func:`data_lock`, with a clear error on time-out."""
    lock = data_lock(params)
    try:
        with lock:
            yield
    except Timeout:
        raise VersioningError(
            f"another deltapatch data operation has held {lock.lock_file} for over "
            f"{LOCK_TIMEOUT_S:.0f} s; wait for it to finish (or remove the file if no deltapatch "
            "process is running)"
        ) from None


@contextlib.contextmanager
def _dvc_quiet() -> Iterator[None]:
    """Silence DVC's console hints ("To track the changes with git, run …"): we report ourselves.

    DVC's `ui` has `enable()` but no public `disable()`; its `_enabled` flag is what `enable()` sets.
    Errors and warnings are written with force=True and still show.
    """
    disable_telemetry()
    from dvc.ui import ui  # lazy: dvc's import reconfigures logging (module docstring)

    dvc_logger = logging.getLogger("dvc")  # hints like "Initialized DVC repository." are INFO logs
    was_enabled, level = ui._enabled, dvc_logger.level
    ui._enabled = False
    dvc_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ui._enabled = was_enabled
        dvc_logger.setLevel(level)

