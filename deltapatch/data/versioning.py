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
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock, Timeout

from deltapatch.config import ConfigError, project_root, resolve_path, section, state_dir
from deltapatch.errors import DeltapatchError
from deltapatch.telemetry import disable_telemetry

log = logging.getLogger(__name__)

DVC_FILE_SUFFIX = ".dvc"
LOCK_NAME = "data.lock"
LOCK_TIMEOUT_S = 900.0  # an ingest of a large task may hold the lock for minutes
TRAILER_TASK = "Deltapatch-Task"
TRAILER_SHA = "Deltapatch-Manifest-Sha256"
GIT_IDENTITY = ("deltapatch", "deltapatch@localhost")
SETUP_MESSAGE = "data: set up DVC data versioning (deltapatch)"


class VersioningError(DeltapatchError):
    """git or DVC refused an operation on the project's data."""

    retryable = True  # mostly a DVC remote that did not answer, or a lock held by another process


@dataclass(frozen=True)
class DataSettings:
    """The ``data:`` section of params.yaml (every key must be listed here).

    root: DVC-tracked folder, relative to the project root (tasks land in ``<root>/tasks/<task>``).
    inbox: where new task datasets arrive; rejected inputs from here are *moved* to quarantine.
    image_size: side in pixels of the square RGB PNGs written for each image.
    val_fraction, test_fraction: per-class fractions for the automatic stratified split.
    min_images_per_class: a class with fewer usable images rejects the task.
    max_bad_fraction: above this fraction of unreadable/truncated/fake files the task is rejected.
    max_image_pixels: width × height above which an image is treated as a decompression bomb.
    max_extract_mb: total uncompressed size an archive may declare (archive bombs).
    dvc_remote: default DVC remote set up when the repository has none (a local folder relative to
        the project root, or any URL DVC understands); empty/null for none.
    """

    root: str = "data"
    inbox: str = "inbox"
    image_size: int = 32
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    min_images_per_class: int = 5
    max_bad_fraction: float = 0.1
    max_image_pixels: int = 16_000_000
    max_extract_mb: int = 2048
    dvc_remote: str | None = ".deltapatch/dvc-remote"


@dataclass(frozen=True)
class DataVersion:
    """Identity of the data a patch was trained on.

    git_commit: full sha of the git commit that recorded ``data.dvc``.
    data_md5: the ``md5`` DVC wrote for the ``data`` output at that commit (e.g. ``<32 hex>.dir``).
    manifest_sha256: sha256 (64 hex) of ``data/tasks/<task>/manifest.csv``.
    task: task name, or None for a commit of ``data.dvc`` not made by an ingest.
    committed_at: ISO-8601 commit date (informational, not part of the identity).
    """

    git_commit: str
    data_md5: str
    manifest_sha256: str
    task: str | None = None
    committed_at: str = field(default="", compare=False)

    def __str__(self) -> str:
        """Compact form ``<commit[:12]>:<data md5>:<manifest sha[:12]>`` (accepted by `checkout`)."""
        return f"{self.git_commit[:12]}:{self.data_md5}:{self.manifest_sha256[:12]}"

    def as_dict(self) -> dict[str, str | None]:
        """Plain dict for MLflow tags / JSON (keys: git_commit, data_md5, manifest_sha256, task, id)."""
        return {
            "git_commit": self.git_commit,
            "data_md5": self.data_md5,
            "manifest_sha256": self.manifest_sha256,
            "task": self.task,
            "id": str(self),
        }


# ----------------------------------------------------------------------------------------- settings


def data_settings(params: dict[str, Any]) -> DataSettings:
    """Build and sanity-check :class:`DataSettings` from params.yaml's ``data:`` section."""
    settings = section(params, "data", DataSettings)
    problems = []
    if int(settings.image_size) < 8:
        problems.append(f"image_size={settings.image_size} (must be ≥ 8)")
    fractions = (settings.val_fraction, settings.test_fraction)
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        problems.append(f"val_fraction/test_fraction={fractions} (each in [0, 1), sum < 1)")
    if int(settings.min_images_per_class) < 1:
        problems.append(f"min_images_per_class={settings.min_images_per_class} (must be ≥ 1)")
    if not 0 <= settings.max_bad_fraction < 1:
        problems.append(f"max_bad_fraction={settings.max_bad_fraction} (must be in [0, 1))")
    if int(settings.max_image_pixels) < 1 or int(settings.max_extract_mb) < 1:
        problems.append("max_image_pixels and max_extract_mb must be positive")
    if problems:
        raise ConfigError("params.yaml: invalid data settings: " + "; ".join(problems))
    return settings


def data_root(params: dict[str, Any], settings: DataSettings | None = None) -> Path:
    """Absolute path of the DVC-tracked data folder; it must lie inside the project."""
    settings = settings or data_settings(params)
    root = project_root(params).resolve()
    path = resolve_path(params, settings.root).resolve()
    if path == root or not path.is_relative_to(root):
        raise ConfigError(
            f"params.yaml: data.root={settings.root!r} must be a sub-folder of the project {root}"
        )
    return path


def tasks_dir(params: dict[str, Any]) -> Path:
    """``<data root>/tasks``: one folder per ingested task."""
    return data_root(params) / "tasks"


def quarantine_dir(params: dict[str, Any]) -> Path:
    """``<data root>/quarantine``: rejected inputs, excluded from data versions by .dvcignore."""
    return data_root(params) / "quarantine"


def _dvc_file(params: dict[str, Any]) -> Path:
    path = data_root(params)
    return path.with_name(path.name + DVC_FILE_SUFFIX)


def _rel(params: dict[str, Any], path: Path) -> str:
    return path.relative_to(project_root(params).resolve()).as_posix()


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
    from dvc.repo import Repo

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


# ---------------------------------------------------------------------------------- project setup


def ensure_project_repo(root: Path, params: dict[str, Any] | None = None) -> None:
    """Make `root` a git + DVC project whose data folder is tracked by ``data.dvc``. Idempotent.

    Steps, each skipped when already done: ``git init``; a local git identity when none is
    configured (CI machines have none); ``dvc init`` with ``core.analytics``/``core.check_update``
    off; the default remote from ``data.dvc_remote`` when the repository has no default remote;
    ``/.deltapatch/`` and the inbox in ``.gitignore``; the quarantine in ``.dvcignore``;
    ``data/tasks/`` created and ``data`` added to DVC. The setup files are committed (only those).
    """
    from deltapatch.config import load_params

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
            from dvc.repo import Repo

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


@contextlib.contextmanager
def _dvc_quiet() -> Iterator[None]:
    """Silence DVC's console hints ("To track the changes with git, run …"): we report ourselves.

    DVC's `ui` has `enable()` but no public `disable()`; its `_enabled` flag is what `enable()` sets.
    Errors and warnings are written with force=True and still show.
    """
    disable_telemetry()
    from dvc.ui import ui

    dvc_logger = logging.getLogger("dvc")  # hints like "Initialized DVC repository." are INFO logs
    was_enabled, level = ui._enabled, dvc_logger.level
    ui._enabled = False
    dvc_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        ui._enabled = was_enabled
        dvc_logger.setLevel(level)


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
    from dvc.exceptions import CheckoutError

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
