"""Data versioning with git + DVC: project setup, one commit per ingested task, listing, checkout.

Layout of a project (all paths relative to the project root, the folder holding params.yaml):

- ``.git/``, ``.dvc/`` – the project is a git repository with DVC initialised; DVC analytics and
  update checks are off in ``.dvc/config``.
- ``data/`` (``data.root``) – one DVC output tracked by the top-level ``data.dvc``; ingested tasks
  live in ``data/tasks/<task>/``.
- ``data/quarantine/`` – rejected inputs; listed in ``.dvcignore`` so it is never part of a data
  version (checking out an old version must not delete quarantined inputs), and git ignores it
  because git ignores all of ``/data``.
- ``.deltapatch/`` – private state: the lock file, staging folders and, by default, the local DVC
  remote (``data.dvc_remote``); git-ignored, like the inbox.

A *data version* of a task is the triple (git commit of ``data.dvc``, md5 of the ``data`` output as
DVC records it, sha256 of the task's ``manifest.csv``). Each successful ingest makes exactly one git
commit touching only ``data.dvc`` (and ``.gitignore`` when DVC changed it); its message carries the
task and the manifest hash as trailers, so :func:`list_versions` reads the history back from
``git log`` alone.

Git is driven through its CLI (plain, well-known semantics such as ``git commit --only``); DVC
through its Python API (``dvc.repo.Repo``), which costs 0.04–0.6 s per call instead of 1–2 s of CLI
start-up. Hashing, caching and remotes are all DVC's.

The package, in the order of the layers it builds on:

- :mod:`~deltapatch.data.versioning.settings` – the ``data:`` settings, paths, the data version type;
- :mod:`~deltapatch.data.versioning.helpers` – running git, opening the DVC repo, the project lock;
- :mod:`~deltapatch.data.versioning.project` – :func:`ensure_project_repo` (git + DVC set-up);
- :mod:`~deltapatch.data.versioning.versions` – committing, listing, checking out, push and pull.

Every public name is re-exported here: ``from deltapatch.data.versioning import …`` is the import.
"""

from deltapatch.data.versioning.helpers import data_lock, git, locked
from deltapatch.data.versioning.project import ensure_project_repo
from deltapatch.data.versioning.settings import (
    DVC_FILE_SUFFIX,
    GIT_IDENTITY,
    LOCK_NAME,
    LOCK_TIMEOUT_S,
    SETUP_MESSAGE,
    TRAILER_SHA,
    TRAILER_TASK,
    DataSettings,
    DataVersion,
    VersioningError,
    data_root,
    data_settings,
    quarantine_dir,
    tasks_dir,
)
from deltapatch.data.versioning.versions import (
    assert_data_in_sync,
    check_remote,
    checkout,
    commit_data_version,
    current_version,
    list_versions,
    pull_data,
    push_data,
    resolve_rev,
)

__all__ = [
    "DVC_FILE_SUFFIX",
    "GIT_IDENTITY",
    "LOCK_NAME",
    "LOCK_TIMEOUT_S",
    "SETUP_MESSAGE",
    "TRAILER_SHA",
    "TRAILER_TASK",
    "DataSettings",
    "DataVersion",
    "VersioningError",
    "assert_data_in_sync",
    "check_remote",
    "checkout",
    "commit_data_version",
    "current_version",
    "data_lock",
    "data_root",
    "data_settings",
    "ensure_project_repo",
    "git",
    "list_versions",
    "locked",
    "pull_data",
    "push_data",
    "quarantine_dir",
    "resolve_rev",
    "tasks_dir",
]
