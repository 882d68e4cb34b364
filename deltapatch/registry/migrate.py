"""`deltapatch registry migrate`: bring an older project to one registry store, once, explicitly.

Older projects may have two stores — ``.deltapatch/mlflow.db`` (commands without a server) and the
stack's own ``.deltapatch/stack/mlflow/mlflow.db`` (artifacts in ``stack/mlflow/artifacts``) — and
experiments whose artifact location is a ``file:`` path. Every DB file touched is first copied to
``.deltapatch/registry-backup-<time>/``; then:

1. ``file:`` locations under ``.deltapatch/mlartifacts/`` are rewritten to ``mlflow-artifacts:/…``,
   the URIs the stack's server writes (the files stay where they are: ``mlflow-artifacts:/X`` names
   ``mlartifacts/X``); experiments get ``mlflow-artifacts:/<id>`` for their new runs;
2. the old stack store holds data and the main store none: it *becomes* the main store (the DB file
   and its artifact tree are moved);
3. both hold data: the old store's runs (params, metric histories, tags, artifacts), logged models
   and registered versions are copied into the main store through MLflow's API. Versions are
   renumbered after the main store's own (tag ``migrated_from``); the base model is matched by
   fingerprint; an alias set in both stores keeps the most recent move, and the report says so.

The old stack store ends up in the backup folder, so it is never read again. The stack must be down.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Param, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.errors import RegistryError
from deltapatch.registry import store
from deltapatch.registry.client import model_versions, registered_models

# (table, key column, URI column) of every MLflow 3 column that records an artifact location
URI_COLUMNS = (("experiments", "experiment_id", "artifact_location"), ("runs", "run_uuid", "artifact_uri"),
               ("logged_models", "model_id", "artifact_location"), ("model_versions", "name", "source"),
               ("model_versions", "name", "storage_location"))
FILE_UNDER_ARTIFACTS = re.compile(rf"^file:(?://)?.*?/{re.escape(store.ARTIFACTS_DIR)}(?:/(?P<rest>.*))?$")


@dataclass
class MigrationReport:
    backup: Path | None = None
    actions: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.actions.append(line)


def plan(state: Path) -> str | None:
    """What `migrate` would do for the project with state folder `state` (None: nothing to do)."""
    problem = store.legacy_problem(state)
    legacy = state / store.LEGACY_STACK_DB
    if problem is None and legacy.is_file():
        return f"move the empty old stack store {legacy} out of the way (into a backup folder)"
    return problem


def migrate(state: Path, stack_running: bool = False) -> MigrationReport:
    """Run the migration of the project whose state folder is `state` (see the module doc)."""
    if stack_running:
        raise RegistryError("the stack is running and serves the registry files that migrate rewrites",
                            hint="stop it with `deltapatch stack down`, run `deltapatch registry migrate`, then "
                                 "`deltapatch stack up`")
    main = store.project_store(state)
    legacy_db = state / store.LEGACY_STACK_DB
    legacy_artifacts = state / store.LEGACY_STACK_ARTIFACTS
    report = MigrationReport()
    if plan(state) is None:
        report.add(f"nothing to migrate: {main.db} is the project's only registry store")
        return report
    report.backup = state / f"registry-backup-{time.strftime('%Y%m%d-%H%M%S')}"
    report.backup.mkdir(parents=True)
    if main.db.is_file():
        shutil.copy2(main.db, report.backup / "mlflow.db")
        report.add(f"backed up {main.db} → {report.backup / 'mlflow.db'}")
    _rewrite_file_uris(main.db, report)  # first: runs copied in below then get mlflow-artifacts:/<id>/… too
    old = store.inspect_store(legacy_db)
    if legacy_db.is_file():
        parked = report.backup / "stack-store"  # in the layout of a store: mlflow.db + mlartifacts/
        parked.mkdir()
        shutil.move(str(legacy_db), parked / store.SQLITE_DB)
        if legacy_artifacts.is_dir():
            shutil.move(str(legacy_artifacts), parked / store.ARTIFACTS_DIR)
        report.add(f"moved the old stack store {legacy_db} (+ artifacts) → {parked}")
        try:
            if not old.empty and store.inspect_store(main.db).empty:
                _adopt(parked, main, report)
            elif not old.empty:
                _merge(parked, main, report)
        except BaseException:
            _restore(report.backup, main, legacy_db, legacy_artifacts)
            raise
    left = store.inspect_store(main.db)
    if left.file_locations:
        report.add(f"{left.file_locations} location(s) outside {main.artifacts} were left as they are (not ours)")
    report.add(f"the registry is {left.describe()}")
    return report


def _restore(backup: Path, main: store.ProjectStore, legacy_db: Path, legacy_artifacts: Path) -> None:
    """Undo a failed migration: the main DB from its backup copy, the old stack store back in place."""
    if (backup / "mlflow.db").is_file():
        shutil.copy2(backup / "mlflow.db", main.db)
    parked = backup / "stack-store"
    legacy_db.parent.mkdir(parents=True, exist_ok=True)
    if (parked / store.SQLITE_DB).is_file():
        shutil.move(str(parked / store.SQLITE_DB), legacy_db)
    if (parked / store.ARTIFACTS_DIR).is_dir():
        shutil.move(str(parked / store.ARTIFACTS_DIR), legacy_artifacts)


# ------------------------------------------------------------------------------------- case 1


def _rewrite_file_uris(db: Path, report: MigrationReport) -> None:
    """`file:…/mlartifacts/X` → `mlflow-artifacts:/X`; experiments → `mlflow-artifacts:/<id>`."""
    if not db.is_file():
        return
    changed = 0
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        for table, _key, column in URI_COLUMNS:
            if table not in tables:
                continue
            for rowid, value in con.execute(f"SELECT rowid, {column} FROM {table} WHERE {column} LIKE 'file:%'").fetchall():
                match = FILE_UNDER_ARTIFACTS.match(value)
                if table == "experiments":
                    experiment = con.execute("SELECT experiment_id FROM experiments WHERE rowid=?", (rowid,)).fetchone()[0]
                    new = f"{store.PROXIED_ROOT}{experiment}"
                elif match:
                    new = store.PROXIED_ROOT + (match.group("rest") or "")
                else:
                    continue
                con.execute(f"UPDATE {table} SET {column}=? WHERE rowid=?", (new, rowid))
                changed += 1
    if changed:
        report.add(f"rewrote {changed} local file location(s) in {db.name} to {store.PROXY_SCHEME}: URIs")


# ------------------------------------------------------------------------------------- case 2


def _adopt(parked: Path, main: store.ProjectStore, report: MigrationReport) -> None:
    """The old stack store is the only one with data: it becomes the project's store."""
    if main.db.is_file():
        main.db.unlink()  # empty (its copy is in the backup)
    if main.artifacts.is_dir():
        shutil.move(str(main.artifacts), report.backup / "mlartifacts-of-the-empty-store")  # type: ignore[operator]
    shutil.copy2(parked / store.SQLITE_DB, main.db)
    if (parked / store.ARTIFACTS_DIR).is_dir():
        shutil.copytree(parked / store.ARTIFACTS_DIR, main.artifacts)
    else:
        main.artifacts.mkdir(parents=True, exist_ok=True)
    report.add(f"the old stack store is now the project's store {main.db} (artifacts in {main.artifacts})")


# ------------------------------------------------------------------------------------- case 3


def _merge(parked: Path, main: store.ProjectStore, report: MigrationReport) -> None:
    """Copy everything of the old store (in `parked`) into the main store through MLflow's API."""

    store.register_scheme()
    store.init_store(main.uri)
    store.use_uri(main.uri)  # MLflow's create_model_version looks logged models up through the global URI
    source_uri = store.sqlite_uri(parked / store.SQLITE_DB)
    merger = _Merger(MlflowClient(source_uri, source_uri), MlflowClient(main.uri, main.uri), source_uri, main.uri, report)
    merger.copy_runs()
    report.add(f"copied {len(merger.runs)} run(s) with their params, metrics, tags and artifacts")
    # Every model of the old store, every page (not only the <prefix> ones: a migration loses nothing).
    versions = {m.name: model_versions(merger.src, m.name) for m in registered_models(merger.src, "")}
    is_base = {name: any((mv.tags or {}).get("kind") == "base" for mv in found) for name, found in versions.items()}
    for name in sorted(versions, key=lambda n: (not is_base[n], n)):  # bases first: patches refer to them
        mapping = merger.copy_model(name, versions[name], is_base[name])
        merger.copy_aliases(name, mapping)


class _Merger:
    def __init__(self, src: Any, dst: Any, source_uri: str, target_uri: str, report: MigrationReport) -> None:
        self.src, self.dst, self.source_uri, self.target_uri, self.report = src, dst, source_uri, target_uri, report
        self.runs: dict[str, str] = {}  # old run id → new
        self.base_versions: dict[int, int] = {}  # old base model version → new (patch tag `base_version`)

    def copy_runs(self) -> None:

        for experiment in self.src.search_experiments(view_type=ViewType.ALL):
            runs = self.src.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=50000)
            if not runs:
                continue
            found = self.dst.get_experiment_by_name(experiment.name)
            target = found.experiment_id if found else store.sql_store(self.target_uri).create_experiment(experiment.name)
            for run in sorted(runs, key=lambda r: r.info.start_time or 0):
                old = run.info.run_id
                tags = {**run.data.tags, "deltapatch.migrated_from_run": old}
                new = self.dst.create_run(target, start_time=run.info.start_time, tags=tags,
                                          run_name=run.info.run_name).info.run_id
                params = [Param(k, v) for k, v in run.data.params.items()]
                metrics = [Metric(m.key, m.value, m.timestamp, m.step)
                           for key in run.data.metrics for m in self.src.get_metric_history(old, key)]
                for start in range(0, max(len(params), len(metrics)), 100):
                    self.dst.log_batch(new, params=params[start:start + 100], metrics=metrics[start:start + 100])
                if self.src.list_artifacts(old):
                    with tempfile.TemporaryDirectory(prefix="deltapatch-migrate-") as tmp:
                        self.dst.log_artifacts(new, self.src.download_artifacts(old, "", tmp))
                self.dst.set_terminated(new, run.info.status, end_time=run.info.end_time)
                self.runs[old] = new

    def copy_logged_model(self, model_id: str) -> str:

        model = self.src.get_logged_model(model_id)
        run_id = self.runs.get(model.source_run_id or "")
        experiment = (self.dst.get_run(run_id).info.experiment_id if run_id
                      else self.dst.get_experiment_by_name("Default").experiment_id)
        new = self.dst.create_logged_model(experiment_id=experiment, name=model.name, source_run_id=run_id,
                                           tags=dict(model.tags or {}), params=dict(model.params or {}),
                                           model_type=model.model_type)
        with tempfile.TemporaryDirectory(prefix="deltapatch-migrate-") as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=tmp,
                                                             tracking_uri=self.source_uri))
            mlmodel = local / "MLmodel"
            if mlmodel.is_file():  # the model's own record of its ids
                text = mlmodel.read_text().replace(model_id, new.model_id)
                if model.source_run_id and run_id:
                    text = text.replace(model.source_run_id, run_id)
                mlmodel.write_text(text)
            self.dst.log_model_artifacts(new.model_id, str(local))
        self.dst.finalize_logged_model(new.model_id, LoggedModelStatus.READY)
        return new.model_id

    def copy_model(self, name: str, versions: list[Any], is_base: bool) -> dict[int, int]:
        """Copy every version of registered model `name`; returns old version → new version."""

        try:
            existing = model_versions(self.dst, name)
        except MlflowException:
            existing = []
        try:
            self.dst.get_registered_model(name)
        except MlflowException:
            model = self.src.get_registered_model(name)
            self.dst.create_registered_model(name, tags=dict(model.tags or {}), description=model.description)
        same_base = {(mv.tags or {}).get("base_fingerprint"): int(mv.version) for mv in existing if is_base}
        mapping: dict[int, int] = {}
        for mv in sorted(versions, key=lambda m: int(m.version)):
            tags = dict(mv.tags or {})
            if is_base and tags.get("base_fingerprint") in same_base:  # the same base is there already
                mapping[int(mv.version)] = same_base[tags["base_fingerprint"]]
                continue
            run_id = self.runs.get(mv.run_id or "")
            logged = getattr(mv, "model_id", None) or _logged_model_id(mv.source)
            model_id = self.copy_logged_model(logged) if logged else None
            tags["migrated_from"] = f"{store.LEGACY_STACK_DB} v{mv.version}"
            if run_id and "run_id" in tags:
                tags["run_id"] = run_id
            if str(tags.get("base_version", "")).isdigit():
                old_base = int(tags["base_version"])
                tags["base_version"] = str(self.base_versions.get(old_base, old_base))
            new = self.dst.create_model_version(name, source=f"models:/{model_id}" if model_id else mv.source,
                                                run_id=run_id, tags=tags, description=mv.description, model_id=model_id)
            mapping[int(mv.version)] = int(new.version)
        if is_base:
            self.base_versions.update(mapping)
        if mapping:
            self.report.add(f"{name}: " + ", ".join(f"v{old}→v{new}" for old, new in sorted(mapping.items())))
        return mapping

    def copy_aliases(self, name: str, mapping: dict[int, int]) -> None:
        """Aliases follow their versions; set in both stores, the most recent move wins (reported)."""
        source_model = self.src.get_registered_model(name)
        target_aliases = self.dst.get_registered_model(name).aliases or {}
        for alias, old_version in (source_model.aliases or {}).items():
            new_version = mapping.get(int(old_version))
            if new_version is None:
                continue
            if alias in target_aliases and int(target_aliases[alias]) != new_version:
                mine, theirs = _alias_change_at(self.dst, name), _alias_change_at(self.src, name)
                if theirs <= mine:
                    self.report.add(f"{name}@{alias}: set in both stores; kept the main store's v{target_aliases[alias]} "
                                    f"(moved {mine or 'later'}; the old store's v{old_version} moved {theirs or 'earlier'})")
                    continue
                self.report.add(f"{name}@{alias}: set in both stores; took the old store's v{old_version} (now "
                                f"v{new_version}, moved {theirs}; the main store's v{target_aliases[alias]} moved "
                                f"{mine or 'earlier'})")
            self.dst.set_registered_model_alias(name, alias, str(new_version))
            change = (source_model.tags or {}).get("last_alias_change")
            if change:
                self.dst.set_registered_model_tag(name, "last_alias_change", change)


def _logged_model_id(source: str | None) -> str | None:
    """`models:/m-<id>` (a version made from a logged model; search results may omit `model_id`)."""
    if source and source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


def _alias_change_at(client: Any, name: str) -> str:
    """ISO time of the model's last alias move (tag `last_alias_change`), '' when unknown."""
    raw = (client.get_registered_model(name).tags or {}).get("last_alias_change", "")
    try:
        return str(json.loads(raw).get("at", "")) if raw else ""
    except (ValueError, AttributeError):
        return ""
