"""A task's data *as a data version recorded it*, wherever the working copy stands.

Training always runs on a registered data version (the ``data_version`` of the flow run). Two callers
need that data while the working copy's ``data/tasks/<task>/`` does not hold it:

- a base upgrade re-trains every champion on its own data version, although the task's folder may
  have been re-ingested since (issue 11: "without touching the working copy's data");
- a worker on another machine has its own clone of the project and no data at all (issue 15).

:func:`task_data_at` answers both: the working-copy folder when its manifest is the recorded one,
otherwise an *export* of the folder at that git revision, read by DVC (``DVCFileSystem(rev=…)``:
the local cache first, else the project's default remote) into ``<state>/exports/<task>-<sha16>``.
An export is immutable and checked against the manifest hash the version records; the working copy,
``data.dvc`` and the DVC workspace state are never touched, so it is safe while ingests run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from dvc.api import DVCFileSystem

from deltapatch.config import project_root, state_dir
from deltapatch.data.ingest.layout import file_sha256
from deltapatch.data.versioning import (
    TRAILER_SHA,
    TRAILER_TASK,
    VersioningError,
    git,
    pull_data,
    resolve_rev,
    tasks_dir,
)
from deltapatch.data.versioning.helpers import _dvc_error, _dvc_quiet
from deltapatch.data.versioning.settings import _rel
from deltapatch.data.versioning.versions import _trailers

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"


def task_data_at(params: dict[str, Any], task: str, data_version: str = "",
                 manifest_sha256: str | None = None, folder: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding `task`'s data as `data_version` recorded it (see the module docstring).

    `folder` (default ``data/tasks/<task>``) is used as is when its manifest hashes to
    `manifest_sha256` (or, without one, when it has a manifest at all). Otherwise the data comes
    from DVC at `data_version`. Without a data version to go by, a missing folder is restored by
    ``dvc pull`` of the current ``data.dvc`` (a project from before data versions were recorded).
    """
    folder = Path(folder) if folder else tasks_dir(params) / task
    manifest = folder / MANIFEST
    if manifest.is_file() and (manifest_sha256 is None or file_sha256(manifest) == manifest_sha256):
        return folder
    if not data_version:
        if manifest.is_file():
            raise VersioningError(
                f"{folder} is not the data this training was asked for (manifest sha256 "
                f"{file_sha256(manifest)[:12]}… ≠ {str(manifest_sha256)[:12]}…) and no data version was given",
                hint="pass the task's data version (`deltapatch data versions --task " + task + "`)")
        pull_data(params)
        return folder
    key = (manifest_sha256 or compact_manifest_prefix(data_version))[:16]
    export = Path(state_dir(params)) / "exports" / f"{task}-{key}"
    sha = export_task(params, data_version, task, export)
    if manifest_sha256 and sha != manifest_sha256:
        raise VersioningError(f"data version {data_version} of '{task}' holds manifest {sha[:12]}…, "
                              f"not the {manifest_sha256[:12]}… this training was asked for")
    return export


def compact_manifest_prefix(data_version: str) -> str:
    """The manifest sha prefix a compact data version ``<commit>:<md5>:<sha prefix>`` ends with ('' for a revision)."""
    return data_version.rsplit(":", 1)[-1] if data_version.count(":") == 2 else ""


def recorded_manifest(params: dict[str, Any], task: str, data_version: str) -> tuple[str, str]:
    """(git commit, manifest sha) that `data_version` records for `task`: the full sha256 from the
    commit's trailer when that commit ingested `task`, else the compact form's prefix ('' if neither)."""
    root = project_root(params).resolve()
    commit = git(root, "rev-parse", "--verify", "-q", f"{resolve_rev(data_version)}^{{commit}}", check=False).strip()
    if not commit:
        raise VersioningError(f"data version {data_version!r} of '{task}': no such git revision in {root}",
                              hint="`deltapatch data versions` lists the recorded versions; on another "
                                   "machine, `git pull` the project first")
    trailers = _trailers(git(root, "show", "-s", "--format=%B", commit))
    recorded = trailers.get(TRAILER_SHA, "") if trailers.get(TRAILER_TASK) == task else ""
    return commit, recorded or compact_manifest_prefix(data_version)


def export_task(params: dict[str, Any], data_version: str, task: str, dst: str | os.PathLike[str]) -> str:
    """Write `task`'s folder as it was at `data_version` into `dst`; returns its manifest's sha256.

    `data_version` is a compact data version ``<commit>:<md5>:<manifest sha prefix>`` or a git
    revision. The manifest must hash to what the version records (the commit's trailer when that
    commit ingested `task`, else the compact form's prefix). The files land in a temporary folder
    renamed to `dst` once complete, so a crash never leaves a half export behind; a `dst` that
    already holds that manifest is reused.
    """
    root = project_root(params).resolve()
    dst = Path(dst)
    commit, expected = recorded_manifest(params, task, data_version)
    if (dst / MANIFEST).is_file():
        sha = file_sha256(dst / MANIFEST)
        if sha.startswith(expected):
            return sha
        shutil.rmtree(dst)  # not what this version records (an interrupted rename cannot cause it)
    source = f"{_rel(params, tasks_dir(params))}/{task}"
    partial = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _dvc_quiet():
            fs = DVCFileSystem(os.fspath(root), rev=commit)
            if not fs.isdir(source):
                raise VersioningError(f"data version {data_version} has no folder {source} (task '{task}')")
            fs.get(source, os.fspath(partial), recursive=True)
    except VersioningError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:  # DVC raises many types; what matters: neither the cache nor the remote had it
        shutil.rmtree(partial, ignore_errors=True)
        raise _dvc_error(f"read {source} at {commit[:12]} from the DVC cache or the remote", exc) from exc
    sha = file_sha256(partial / MANIFEST)
    if not sha.startswith(expected):
        shutil.rmtree(partial, ignore_errors=True)
        raise VersioningError(f"{source} at {commit[:12]}: manifest sha256 {sha[:12]}… is not the recorded "
                              f"{expected[:12]}…: the data version is inconsistent")
    try:
        partial.rename(dst)
    except OSError:  # another process exported the same version meanwhile: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    log.info("exported '%s' at data version %s into %s", task, data_version, dst)
    return sha
