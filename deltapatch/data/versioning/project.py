"""Project setup: make a folder a git + DVC project whose data folder is tracked by ``data.dvc``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deltapatch.config import load_params, project_root, resolve_path
from deltapatch.data.versioning.helpers import _dvc_error, _dvc_quiet, _dvc_repo, git, locked
from deltapatch.data.versioning.settings import (
    GIT_IDENTITY,
    SETUP_MESSAGE,
    DataSettings,
    _dvc_file,
    _rel,
    data_root,
    data_settings,
)

# ---------------------------------------------------------------------------------- project setup


def ensure_project_repo(root: Path, params: dict[str, Any] | None = None) -> None:
    """Make `root` a git + DVC project whose data folder is tracked by ``data.dvc``. Idempotent.

    Steps, each skipped when already done: ``git init``; a local git identity when none is
    configured (CI machines have none); ``dvc init`` with ``core.analytics``/``core.check_update``
    off; the default remote from ``data.dvc_remote`` when the repository has no default remote;
    ``/.deltapatch/`` and the inbox in ``.gitignore``; the quarantine in ``.dvcignore``;
    ``data/tasks/`` created and ``data`` added to DVC. The setup files are committed (only those).
    """
    params = params if params is not None else load_params(Path(root))
    with locked(params):
        _ensure_project_repo_locked(params)


def _ensure_project_repo_locked(params: dict[str, Any]) -> None:
    """The steps of :func:`ensure_project_repo`; commits only the files this call created or changed
    (never, say, a ``data.dvc`` that differs from HEAD because an old version is checked out)."""
    root = project_root(params).resolve()
    settings = data_settings(params)
    data = data_root(params, settings)
    touched: list[str] = []
    if not (root / ".git").exists():
        git(root, "init", "-q")
    _ensure_git_identity(root)
    if not (root / ".dvc").is_dir():
        with _dvc_quiet():
            from dvc.repo import Repo  # lazy: dvc's import reconfigures logging (see helpers.py)

            Repo.init(os.fspath(root)).close()
        touched += [".dvc/config", ".dvc/.gitignore", ".dvcignore"]
    if _ensure_dvc_config(root, settings):
        touched.append(".dvc/config")
    if _append_lines(root / ".gitignore", ["/.deltapatch/", _ignore_pattern(params, settings.inbox)]):
        touched.append(".gitignore")
    if _append_lines(root / ".dvcignore", [f"/{_rel(params, data)}/quarantine/"]):
        touched.append(".dvcignore")
    (data / "tasks").mkdir(parents=True, exist_ok=True)
    if not _dvc_file(params).exists():
        _dvc_add(params)
        touched += [_rel(params, _dvc_file(params)), ".gitignore"]
    if touched:
        _commit_paths(root, sorted(set(touched)), SETUP_MESSAGE)


def _ensure_git_identity(root: Path) -> None:
    # A commit without an identity fails on machines with no global git config (CI, containers).
    name, email = GIT_IDENTITY
    if not git(root, "config", "user.email", check=False).strip():
        git(root, "config", "user.email", email)
    if not git(root, "config", "user.name", check=False).strip():
        git(root, "config", "user.name", name)


def _ensure_dvc_config(root: Path, settings: DataSettings) -> bool:
    """Telemetry off; a default remote from params when the repository has none. True if edited."""
    with _dvc_repo(root) as repo:
        core = repo.config["core"]
        has_default = bool(core.get("remote"))
        needs_core = core.get("analytics") is not False or core.get("check_update") is not False
        if not needs_core and (has_default or not settings.dvc_remote):
            return False
        with repo.config.edit("repo") as conf:
            conf["core"]["analytics"] = False
            conf["core"]["check_update"] = False
            if not has_default and settings.dvc_remote:
                conf["remote"]["local"] = {"url": _remote_url(root, settings.dvc_remote)}
                conf["core"]["remote"] = "local"
    return True


def _remote_url(root: Path, value: str) -> str:
    """A URL (``s3://…``) stays as is; a local folder is created and given relative to the cwd.

    DVC's config writer reads a relative local path as relative to the cwd and stores it relative
    to ``.dvc/`` (as ``dvc remote add`` does), which keeps the project relocatable.
    """
    if "://" in value:
        return value
    path = Path(value)
    path = path if path.is_absolute() else root / path
    path.mkdir(parents=True, exist_ok=True)
    return os.path.relpath(path.resolve(), Path.cwd())


def _ignore_pattern(params: dict[str, Any], value: str) -> str | None:
    path = resolve_path(params, value).resolve()
    root = project_root(params).resolve()
    if path == root or not path.is_relative_to(root):
        return None  # outside the project: nothing for git to ignore
    return f"/{_rel(params, path)}/"


def _append_lines(path: Path, lines: list[str | None]) -> bool:
    """Append each line missing from the text file `path` (created when absent). True if changed."""
    text = path.read_text() if path.exists() else ""
    present = set(text.splitlines())
    missing = [line for line in lines if line and line not in present]
    if missing:
        sep = "" if not text or text.endswith("\n") else "\n"
        path.write_text(text + sep + "\n".join(missing) + "\n")
    return bool(missing)


def _commit_paths(root: Path, paths: list[str], message: str) -> bool:
    """Commit exactly `paths` (whatever else is staged stays staged); False when nothing changed."""
    existing = [p for p in paths if (root / p).exists()]
    if not git(root, "status", "--porcelain", "--", *existing).strip():
        return False
    git(root, "add", "--", *existing)
    # --only: the commit holds these paths and nothing else the user may have staged.
    git(root, "commit", "-q", "--only", "-m", message, "--", *existing)
    return True


def _dvc_add(params: dict[str, Any]) -> None:
    root = project_root(params).resolve()
    with _dvc_repo(root) as repo:
        try:
            repo.add(os.fspath(data_root(params)))  # absolute: DVC resolves relative paths from the cwd
        except Exception as exc:  # DVC raises many types; the message is what the user needs
            raise _dvc_error(f"add {_rel(params, data_root(params))}", exc) from exc

