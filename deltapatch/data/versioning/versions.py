"""Versioning proper: commit a data version, list versions, check one out, push and pull."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from deltapatch.config import project_root
from deltapatch.data.versioning.helpers import _dvc_error, _dvc_repo, git, locked
from deltapatch.data.versioning.project import _commit_paths, _dvc_add, _ensure_project_repo_locked
from deltapatch.data.versioning.settings import (
    TRAILER_SHA,
    TRAILER_TASK,
    DataVersion,
    VersioningError,
    _dvc_file,
    _rel,
    data_root,
)

log = logging.getLogger(__package__)  # the package's logger, as before the split into modules

# ------------------------------------------------------------------------------- versioning proper


def assert_data_in_sync(params: dict[str, Any]) -> None:
    """Refuse to version when ``data.dvc`` or the data folder differ from the last commit.

    Committing on top of a checked-out old version (or of hand edits) would silently drop or
    change other tasks' data.
    """
    root = project_root(params).resolve()
    dvc_file = _rel(params, _dvc_file(params))
    if git(root, "rev-parse", "--verify", "-q", "HEAD", check=False).strip():
        if git(root, "status", "--porcelain", "--", dvc_file).strip():
            raise VersioningError(
                f"{dvc_file} differs from the last commit (an older data version is checked out, or "
                f"it was edited); run `deltapatch data checkout HEAD` (or commit {dvc_file}) first"
            )
    _assert_workspace_recorded(params)


def commit_data_version(
    params: dict[str, Any], task: str, manifest_sha: str, push: bool = True
) -> DataVersion:
    """Record the current data folder as a new data version of `task`.

    Under the project lock: ``dvc add data``; commit only ``data.dvc`` (and ``.gitignore`` when DVC
    changed it) with a message naming the task and its manifest sha256; then (with `push`)
    ``dvc push`` to the default remote. A failed push is logged, not raised: the version is
    recorded locally and the push can be repeated (see :func:`push_data`). When ``dvc add`` or the
    commit fails, ``data.dvc`` is restored to HEAD's.
    """
    root = project_root(params).resolve()
    with locked(params):
        _ensure_project_repo_locked(params)
        dvc_file = _rel(params, _dvc_file(params))
        head = git(root, "rev-parse", "HEAD").strip()
        message = (
            f"data: ingest task {task} (manifest {manifest_sha[:12]})\n\n"
            f"{TRAILER_TASK}: {task}\n{TRAILER_SHA}: {manifest_sha}\n"
        )
        try:
            _dvc_add(params)
            if not _commit_paths(root, [dvc_file, ".gitignore"], message):
                # Same bytes as HEAD (the content was re-added by hand): still record the version.
                git(root, "commit", "-q", "--allow-empty", "-m", message, "--only", "--", dvc_file)
        except BaseException:
            if git(root, "rev-parse", "HEAD").strip() == head:
                git(root, "checkout", "HEAD", "--", dvc_file, check=False)
            raise
        version = _version_at(params, "HEAD", task, manifest_sha)
        problem = push_data(params) if push else None
        if problem:
            log.warning(problem)
    return version


def push_data(params: dict[str, Any]) -> str | None:
    """``dvc push`` of ``data.dvc`` to the default remote; returns None on success, else the problem."""
    root = project_root(params).resolve()
    with _dvc_repo(root) as repo:
        if not repo.config["core"].get("remote"):
            return (
                "no default DVC remote: the data version is only in the local DVC cache; add one "
                "with `dvc remote add -d NAME URL` (or set data.dvc_remote) and run `dvc push`"
            )
        try:
            repo.push(targets=[os.fspath(_dvc_file(params))])
        except Exception as exc:
            return f"`dvc push` failed ({type(exc).__name__}: {exc}); the data version is committed locally, run `dvc push` once the remote is reachable"
    return None


def check_remote(params: dict[str, Any]) -> tuple[str, str | None]:
    """(the default DVC remote as 'name (url)', the problem or None): does it answer ``dvc status
    --cloud``? A project without a DVC repository yet has no remote to check (problem None, '')."""
    root = project_root(params).resolve()
    if not (root / ".dvc").is_dir():
        return "", None
    with _dvc_repo(root) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            return "", ("no default DVC remote: data versions stay in the local cache only; add one with "
                        "`dvc remote add -d NAME URL` (or set data.dvc_remote)")
        url = str(repo.config["remote"].get(name, {}).get("url", "?"))
        label = f"{name} ({url})"
        if "://" not in url and not Path(url).is_dir():
            return label, f"the remote folder {url} does not exist; create it or fix `dvc remote modify {name} url`"
        try:
            repo.status(cloud=True, remote=name)
        except Exception as exc:  # noqa: BLE001 — any failure to talk to the remote is the answer
            return label, f"`dvc status --cloud` failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return label, None


def current_version(params: dict[str, Any], task: str, manifest_sha: str) -> DataVersion:
    """The data version HEAD holds for `task` (used when the task was committed by other means)."""
    return _version_at(params, "HEAD", task, manifest_sha)


def _version_at(params: dict[str, Any], rev: str, task: str | None, manifest_sha: str) -> DataVersion:
    root = project_root(params).resolve()
    commit = git(root, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    date = git(root, "show", "-s", "--format=%cI", commit).strip()
    md5 = _md5_from_dvc_text(git(root, "show", f"{commit}:{_rel(params, _dvc_file(params))}"))
    return DataVersion(commit, md5, manifest_sha, task, date)


def _md5_from_dvc_text(text: str) -> str:
    """The ``md5`` of the single output in a ``.dvc`` file's YAML text ('' when unreadable)."""
    try:
        outs = (yaml.safe_load(text) or {}).get("outs") or []
        return str(outs[0].get("md5", "")) if outs else ""
    except (yaml.YAMLError, AttributeError, IndexError):
        return ""


def list_versions(params: dict[str, Any], task: str | None = None) -> list[DataVersion]:
    """Data versions from ``git log -- data.dvc``, newest first.

    With `task`, only the commits made by ingests of that task; without, every commit of
    ``data.dvc`` (those not made by an ingest have ``task=None`` and an empty manifest sha).
    """
    root = project_root(params).resolve()
    dvc_file = _rel(params, _dvc_file(params))
    if not git(root, "rev-parse", "--verify", "-q", "HEAD", check=False).strip():
        return []
    log_text = git(root, "log", "--format=%H%x1f%cI%x1f%B%x1e", "--", dvc_file)
    entries = []
    for record in log_text.split("\x1e"):
        if not record.strip():
            continue
        commit, date, body = record.strip("\n").split("\x1f", 2)
        trailers = _trailers(body)
        name = trailers.get(TRAILER_TASK)
        if task is not None and name != task:
            continue
        entries.append((commit, date, name, trailers.get(TRAILER_SHA, "")))
    md5s = _md5s_at(root, [f"{commit}:{dvc_file}" for commit, *_ in entries])
    return [
        DataVersion(commit, md5, sha, name, date)
        for (commit, date, name, sha), md5 in zip(entries, md5s, strict=True)
    ]


def _trailers(body: str) -> dict[str, str]:
    out = {}
    for line in body.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in (TRAILER_TASK, TRAILER_SHA):
            out[key] = value.strip()
    return out


def _md5s_at(root: Path, objects: list[str]) -> list[str]:
    """The output md5 of ``.dvc`` files given as ``<commit>:<path>``, via one ``git cat-file --batch``."""
    if not objects:
        return []
    proc = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=root,
        input=("\n".join(objects) + "\n").encode(),
        capture_output=True,
        check=True,
    )
    out, pos, md5s = proc.stdout, 0, []
    for _ in objects:
        header_end = out.index(b"\n", pos)
        header = out[pos:header_end].split()
        if header[-1] == b"missing":
            md5s.append("")
            pos = header_end + 1
            continue
        size = int(header[2])
        md5s.append(_md5_from_dvc_text(out[header_end + 1 : header_end + 1 + size].decode()))
        pos = header_end + 1 + size + 1
    return md5s


def resolve_rev(value: str) -> str:
    """Accept a git revision or a compact data version ``<commit>:<md5>:<sha>`` (its commit part)."""
    return value.split(":", 1)[0] if value.count(":") == 2 else value


def checkout(params: dict[str, Any], rev: str) -> DataVersion:
    """Restore ``data/`` as it was at `rev` (git revision or compact data version).

    ``git checkout REV -- data.dvc`` then ``dvc checkout`` (fetching from the remote when the local
    cache lacks the data). The workspace must match the current ``data.dvc`` first, so nothing
    unrecorded is lost; the quarantine is untouched (it is in .dvcignore). ``checkout HEAD`` returns
    to the latest version. Returns the data version now in the workspace (task/manifest from the
    commit's trailers when it was an ingest).
    """
    root = project_root(params).resolve()
    dvc_file = _rel(params, _dvc_file(params))
    commit = git(root, "rev-parse", "--verify", "-q", f"{resolve_rev(rev)}^{{commit}}", check=False).strip()
    if not commit:
        raise VersioningError(f"unknown revision {rev!r}; list data versions with `deltapatch data versions`")
    probe = ["git", "cat-file", "-e", f"{commit}:{dvc_file}"]
    if subprocess.run(probe, cwd=root, capture_output=True, check=False).returncode:
        raise VersioningError(f"revision {rev!r} has no {dvc_file}; pick one from `deltapatch data versions`")
    with locked(params):
        _assert_workspace_recorded(params, allow_deleted=True)
        git(root, "checkout", commit, "--", dvc_file)
        _dvc_checkout(root, os.fspath(_dvc_file(params)))
    body = git(root, "show", "-s", "--format=%B", commit)
    trailers = _trailers(body)
    return _version_at(params, commit, trailers.get(TRAILER_TASK), trailers.get(TRAILER_SHA, ""))


def _assert_workspace_recorded(params: dict[str, Any], allow_deleted: bool = False) -> None:
    """The data folder must match the ``data.dvc`` in the workspace (whatever commit it came from).

    `dvc status` alone cannot tell: when the cache lacks the data it reports "not in cache" and
    hides whether the workspace was modified, so each output's workspace status is read directly.
    A workspace that matches but is missing from the cache is re-cached (``dvc commit``), so a
    following checkout can never delete the only copy. A deleted data folder is accepted with
    `allow_deleted` (a checkout restores it; an ingest would record the deletion).
    """
    root = project_root(params).resolve()
    dvc_file = _rel(params, _dvc_file(params))
    target = os.fspath(_dvc_file(params))
    with _dvc_repo(root) as repo:
        try:
            outs = [out for stage in repo.stage.collect(target) for out in stage.outs]
            states = {str(out): out.workspace_status().get(str(out), "ok") for out in outs}
            uncached = [
                out for out in outs if states[str(out)] == "ok" and out.hash_info and out.changed_cache()
            ]
            if uncached:
                repo.commit(target, force=True)
        except Exception as exc:
            raise _dvc_error(f"read the status of {dvc_file}", exc) from exc
    bad = {
        name: state
        for name, state in states.items()
        if state != "ok" and not (allow_deleted and state == "deleted")
    }
    if bad:
        data = _rel(params, data_root(params))
        raise VersioningError(
            f"{data}/ has changes not recorded in {dvc_file} ({bad}); record them first "
            f"(`dvc add {data}` and commit {dvc_file}) or discard them with "
            f"`dvc checkout --force {dvc_file}` (or `dvc pull` when {data}/ was deleted)"
        )


def _dvc_checkout(root: Path, dvc_file: str) -> None:
    from dvc.exceptions import CheckoutError  # lazy: dvc's import reconfigures logging (see helpers.py)

    with _dvc_repo(root) as repo:
        try:
            repo.checkout(targets=[dvc_file], force=True)
            return
        except CheckoutError:
            pass  # not in the local cache (fresh clone, cleared cache): fetch it
        try:
            repo.pull(targets=[dvc_file], force=True)
        except Exception as exc:
            raise _dvc_error(
                f"restore {dvc_file} from the cache or the remote (is the remote reachable?)", exc
            ) from exc


def pull_data(params: dict[str, Any]) -> None:
    """``dvc pull`` of ``data.dvc``: restore the data folder from the cache or the default remote."""
    root = project_root(params).resolve()
    dvc_file = _rel(params, _dvc_file(params))
    with locked(params), _dvc_repo(root) as repo:
        try:
            repo.pull(targets=[os.fspath(_dvc_file(params))], force=True)
        except Exception as exc:
            raise _dvc_error(f"pull {dvc_file}", exc) from exc
