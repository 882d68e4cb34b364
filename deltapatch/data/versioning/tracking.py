"""Tracking single files of the project with DVC (one ``.dvc`` file each, beside it): the base weights.

Data versions (:mod:`~deltapatch.data.versioning.versions`) track the whole ``data/`` folder in
``data.dvc``; a base's weights are another artefact with their own history, so they get their own
``.dvc`` file (``models/base.safetensors.dvc``) and a commit of only that file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from deltapatch.config import project_root
from deltapatch.data.versioning.helpers import _dvc_error, _dvc_repo, git, locked
from deltapatch.data.versioning.project import _commit_paths, ensure_project_repo
from deltapatch.data.versioning.settings import DVC_FILE_SUFFIX, VersioningError, _rel

log = logging.getLogger(__name__)


def track_files(params: dict[str, Any], paths: list[Path], message: str) -> str:
    """``dvc add`` each file, commit exactly their ``.dvc`` files and their folder's ``.gitignore``,
    and push them to the default remote (best effort, like a data version: ``dvc push`` later).
    Returns the commit (HEAD when nothing changed)."""
    root = project_root(params).resolve()
    files = [Path(p).resolve() for p in paths]
    outside = [str(p) for p in files if not p.is_relative_to(root)]
    if outside:
        raise VersioningError(f"{outside} lie outside the project {root}: DVC can only track files inside it")
    ensure_project_repo(root, params)
    with locked(params):
        with _dvc_repo(root) as repo:
            try:
                repo.add([os.fspath(p) for p in files])
            except Exception as exc:  # DVC raises many types; the message is what the user needs
                raise _dvc_error(f"add {[_rel(params, p) for p in files]}", exc) from exc
        tracked = [_rel(params, p.with_name(p.name + DVC_FILE_SUFFIX)) for p in files]
        ignores = sorted({_rel(params, p.parent / ".gitignore") for p in files})
        _commit_paths(root, tracked + ignores, message)
        commit = git(root, "rev-parse", "HEAD").strip()
        with _dvc_repo(root) as repo:
            if repo.config["core"].get("remote"):
                try:
                    repo.push(targets=[os.fspath(root / t) for t in tracked])
                except Exception as exc:  # noqa: BLE001 — recorded locally; `dvc push` later
                    log.warning("`dvc push` of %s failed (%s); run `dvc push` once the remote is reachable",
                                tracked, exc)
    return commit
