"""One MLflow store per project, in every mode.

The store is ``.deltapatch/mlflow.db`` (sqlite) with its artifacts in ``.deltapatch/mlartifacts``:

- with the stack up, its MLflow server serves exactly that store
  (``--backend-store-uri sqlite:///…/mlflow.db --artifacts-destination …/mlartifacts``), so artifacts
  are *proxied*: runs, logged models and versions record ``mlflow-artifacts:/<experiment>/…`` URIs,
  never a path of this machine (a worker on another machine registers through the server's HTTP API);
- without a server, commands open the same sqlite file directly, and :func:`artifact_repository`
  resolves the same ``mlflow-artifacts:/X`` URIs to ``<folder of the DB>/mlartifacts/X``, the file the
  server would have written. A patch registered in one mode is listed, served and rolled back in the
  other.

The rule "a sqlite store's proxied artifacts live in ``mlartifacts/`` beside the DB file" is the only
link between the two modes; it is registered for the ``mlflow-artifacts`` scheme by :func:`configure`
(and as an MLflow entry point, so plain MLflow tools on the project's sqlite URI resolve them too).
With any other tracking URI (a server) the scheme keeps MLflow's own proxy client.

Projects from before this rule may hold a second store (the stack's old
``.deltapatch/stack/mlflow/mlflow.db``) or experiments whose artifact location is a ``file:`` path:
:func:`check_single_store` refuses to pick one silently and names the fix,
``deltapatch registry migrate`` (:mod:`deltapatch.registry.migrate`).

This module imports MLflow lazily: it is loaded by MLflow's plugin registry at MLflow import time.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltapatch.errors import RegistryError

SQLITE_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
PROXY_SCHEME = "mlflow-artifacts"
PROXIED_ROOT = f"{PROXY_SCHEME}:/"  # default artifact root of every experiment (server or not)
LEGACY_STACK_DB = Path("stack") / "mlflow" / "mlflow.db"  # the stack's own store before the one-store rule
LEGACY_STACK_ARTIFACTS = Path("stack") / "mlflow" / "artifacts"
MIGRATE_HINT = "run `deltapatch registry migrate` (one time; it keeps a backup of both files)"


@dataclass(frozen=True)
class ProjectStore:
    """Where a project's registry lives on disk."""

    db: Path
    artifacts: Path

    @property
    def uri(self) -> str:
        return sqlite_uri(self.db)


def project_store(state: Path) -> ProjectStore:
    """The store of the project whose state folder (``.deltapatch``) is `state`."""
    return ProjectStore(state / SQLITE_DB, state / ARTIFACTS_DIR)


def sqlite_uri(db: Path) -> str:
    return f"sqlite:///{Path(db).resolve()}"


def sqlite_path(uri: str | None) -> Path | None:
    """The DB file of a ``sqlite:///`` URI, else None."""
    if not uri or not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri[len("sqlite:///"):].split("?", 1)[0]))


def artifacts_beside(db: Path) -> Path:
    """The proxied-artifacts folder of a sqlite store: ``mlartifacts/`` beside the DB file."""
    return Path(db).parent / ARTIFACTS_DIR


# ------------------------------------------------------------------------------- mlflow-artifacts:


def proxied_path(artifact_uri: str) -> str:
    """``mlflow-artifacts:/1/abc`` or ``mlflow-artifacts://host:port/1/abc`` → ``1/abc``."""
    parsed = urllib.parse.urlparse(artifact_uri)
    return parsed.path.lstrip("/")


def local_path_of(artifact_uri: str, artifacts: Path) -> Path:
    """Where the server with ``--artifacts-destination artifacts`` keeps `artifact_uri`."""
    root = Path(artifacts).resolve()
    target = (root / proxied_path(artifact_uri)).resolve()
    if target != root and root not in target.parents:
        raise RegistryError(f"artifact URI {artifact_uri} points outside the artifact folder {root}")
    return target


def artifact_repository(artifact_uri: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> Any:
    """MLflow artifact-repository factory for the ``mlflow-artifacts`` scheme.

    Tracking URI a sqlite store → the files beside it (what its server would serve); anything else →
    MLflow's own proxy client (HTTP to the tracking server).
    """
    from mlflow.store.artifact.local_artifact_repo import (
        LocalArtifactRepository,  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths
    )
    from mlflow.store.artifact.mlflow_artifacts_repo import (
        MlflowArtifactsRepository,  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths
    )
    from mlflow.tracking._tracking_service.utils import (
        get_tracking_uri,  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths
    )

    db = sqlite_path(tracking_uri or get_tracking_uri())
    if db is None:
        return MlflowArtifactsRepository(artifact_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    folder = local_path_of(artifact_uri, artifacts_beside(db))
    return LocalArtifactRepository(folder.as_uri(), tracking_uri=tracking_uri, registry_uri=registry_uri)


def use_uri(uri: str) -> None:
    """Point this process's MLflow (tracking and registry) at `uri`, without exporting it.

    MLflow's setters also export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI; the user's own values are put
    back, else an exported one would read as "set by the user" to the next project this process opens.
    Some of MLflow's registry code reads the global URI, not its client's (create_model_version).
    """
    import mlflow  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths

    exported = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in exported.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def register_scheme() -> None:
    """Route ``mlflow-artifacts:`` through :func:`artifact_repository` in this process (idempotent)."""
    from mlflow.store.artifact.artifact_repository_registry import (
        _artifact_repository_registry,  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths
    )

    _artifact_repository_registry.register(PROXY_SCHEME, artifact_repository)


def init_store(uri: str) -> None:
    """Create the sqlite store's tables the way its server would (default artifact root
    ``mlflow-artifacts:/``), so not even MLflow's Default experiment records a local path."""
    db = sqlite_path(uri)
    if db is None or db.is_file():
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    artifacts_beside(db).mkdir(parents=True, exist_ok=True)
    sql_store(uri)


def sql_store(uri: str) -> Any:
    """MLflow's SqlAlchemyStore on `uri` with the proxied default artifact root (what the server uses)."""
    from mlflow.store.tracking.sqlalchemy_store import (
        SqlAlchemyStore,  # lazy: mlflow takes seconds to import; stack status/down and doctor use only this module's paths
    )

    return SqlAlchemyStore(uri, PROXIED_ROOT)


# ------------------------------------------------------------------------------- legacy detection


@dataclass
class StoreReport:
    """What a sqlite store file holds (read with plain sqlite3: no MLflow, no migration)."""

    db: Path
    registered_models: int = 0
    versions: int = 0
    runs: int = 0
    file_locations: int = 0  # experiments/runs/models whose artifact location is a local `file:` path

    @property
    def empty(self) -> bool:
        return self.registered_models == 0 and self.runs == 0

    def describe(self) -> str:
        return f"{self.db} ({self.registered_models} model(s), {self.versions} version(s), {self.runs} run(s))"


def inspect_store(db: Path) -> StoreReport:
    """Counts of a store file; an unreadable or foreign file counts as empty."""
    report = StoreReport(Path(db))
    if not Path(db).is_file():
        return report
    queries = {
        "registered_models": "SELECT COUNT(*) FROM registered_models",
        "versions": "SELECT COUNT(*) FROM model_versions",
        "runs": "SELECT COUNT(*) FROM runs",
        "file_locations": "SELECT (SELECT COUNT(*) FROM experiments WHERE artifact_location LIKE 'file:%' "
                          "AND lifecycle_stage = 'active' AND name != 'Default') "
                          "+ (SELECT COUNT(*) FROM runs WHERE artifact_uri LIKE 'file:%')",
    }
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            for key, query in queries.items():
                try:
                    setattr(report, key, int(con.execute(query).fetchone()[0]))
                except sqlite3.Error:
                    pass  # a table missing in an old or new schema: nothing of that kind
    except sqlite3.Error:
        return report
    return report


def legacy_problem(state: Path) -> str | None:
    """Why this project's registry needs `deltapatch registry migrate`, or None."""
    store = project_store(state)
    legacy = state / LEGACY_STACK_DB
    main = inspect_store(store.db)
    if legacy.is_file():
        old = inspect_store(legacy)
        if not old.empty:
            if main.empty:
                return (f"this project's registry is still in the old stack store {old.describe()}, while every "
                        f"mode now uses {store.db}; {MIGRATE_HINT}")
            return (f"this project has two registry stores: {main.describe()} and {old.describe()}; "
                    f"deltapatch will not pick one silently: {MIGRATE_HINT} to merge them into {store.db.name}")
    if main.file_locations:
        return (f"the registry {store.db} records {main.file_locations} artifact location(s) as local file paths "
                f"(written by an older deltapatch); {MIGRATE_HINT} to switch them to mlflow-artifacts: URIs")
    return None


def check_single_store(state: Path) -> None:
    """Raise RegistryError naming the files and the fix when the project's store needs migrating."""
    problem = legacy_problem(state)
    if problem:
        raise RegistryError(problem)
