"""Data versioning with real git + DVC: setup, commits, listing, checkout, push/pull, concurrency, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deltapatch.config import load_params
from deltapatch.data.ingest import file_sha256, ingest, read_manifest
from deltapatch.data.versioning import (
    DataVersion,
    VersioningError,
    checkout,
    ensure_project_repo,
    git,
    list_versions,
    pull_data,
)

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def fresh_project(tmp_path: Path) -> Path:
    root = tmp_path / "fresh"
    root.mkdir()
    shutil.copy(PARAMS, root / "params.yaml")
    return root


def test_ensure_project_repo_sets_up_and_is_idempotent(tmp_path):
    root = fresh_project(tmp_path)
    ensure_project_repo(root)
    head = git(root, "rev-parse", "HEAD").strip()
    ensure_project_repo(root)
    assert git(root, "rev-parse", "HEAD").strip() == head, "second run changes nothing"
    config = (root / ".dvc" / "config").read_text()
    assert "analytics = False" in config and "check_update = False" in config
    assert "remote = local" in config and "url = ../.deltapatch/dvc-remote" in config
    assert (root / ".deltapatch" / "dvc-remote").is_dir()
    assert {"/.deltapatch/", "/inbox/", "/data"} <= set((root / ".gitignore").read_text().splitlines())
    assert "/data/quarantine/" in (root / ".dvcignore").read_text()
    assert (root / "data.dvc").is_file() and (root / "data" / "tasks").is_dir()
    assert git(root, "config", "user.email").strip()
    assert git(root, "status", "--porcelain").strip() == "?? params.yaml", "setup files are committed"
    assert git(root, "show", "--stat", "--format=%s", "HEAD").startswith("data: set up DVC")


def test_existing_default_remote_is_kept(tmp_path):
    root = fresh_project(tmp_path)
    git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(tmp_path / "team-remote")],
        cwd=root,
        check=True,
    )
    ensure_project_repo(root)
    config = (root / ".dvc" / "config").read_text()
    assert "remote = team" in config and 'remote "local"' not in config


def test_data_version_forms():
    version = DataVersion("a" * 40, "b" * 32 + ".dir", "c" * 64, "task")
    assert str(version) == f"{'a' * 12}:{'b' * 32}.dir:{'c' * 12}"
    assert version.as_dict()["id"] == str(version) and version.as_dict()["task"] == "task"


def test_commit_touches_only_data_dvc(project, make_dataset):
    root = Path(project["_root"])
    (root / "notes.md").write_text("work in progress\n")
    git(root, "add", "notes.md")
    result = ingest(make_dataset("only-dvc"), project)
    changed = git(root, "show", "--name-only", "--format=", "HEAD").split()
    assert changed == ["data.dvc"]
    assert git(root, "status", "--porcelain").strip() == "A  notes.md", "the user's staged work stays staged"
    body = git(root, "show", "-s", "--format=%B", "HEAD")
    assert "only-dvc" in body.splitlines()[0] and result.manifest_sha256[:12] in body.splitlines()[0]
    assert f"Deltapatch-Manifest-Sha256: {result.manifest_sha256}" in body


def test_list_versions_filters_by_task(project, make_dataset):
    a = ingest(make_dataset("task-a"), project).data_version
    b = ingest(make_dataset("task-b", seed=1), project).data_version
    assert list_versions(project, "task-a") == [a]
    everything = list_versions(project)
    assert everything[:2] == [b, a] and everything[-1].task is None  # the setup commit comes last


def test_checkout_restores_old_version(project, state, make_dataset, image_writer):
    path = make_dataset("history")
    v1 = ingest(path, project)
    manifest_v1 = (v1.task_dir / "manifest.csv").read_bytes()
    (Path(project["_root"]) / "data" / "quarantine" / "keep").mkdir(parents=True)
    image_writer(path / "b" / "img2.png", 777)
    v2 = ingest(path, project)
    restored = checkout(project, str(v1.data_version))
    assert restored == v1.data_version
    assert (v1.task_dir / "manifest.csv").read_bytes() == manifest_v1
    assert (Path(project["_root"]) / "data" / "quarantine" / "keep").is_dir(), "quarantine is not versioned"
    with pytest.raises(VersioningError, match="data checkout HEAD"):
        ingest(make_dataset("blocked", seed=5), project)  # would drop v2 silently
    assert checkout(project, "HEAD") == v2.data_version
    assert file_sha256(v2.task_dir / "manifest.csv") == v2.manifest_sha256
    assert state(project)[2] == ""


def test_checkout_unknown_revision(project):
    with pytest.raises(VersioningError, match="unknown revision 'nope'"):
        checkout(project, "nope")


def test_unrecorded_workspace_changes_block_ingest(project, make_dataset):
    first = ingest(make_dataset("edited"), project)
    next(first.task_dir.rglob("*.png")).unlink()
    with pytest.raises(VersioningError, match="changes not recorded in data.dvc"):
        ingest(make_dataset("next", seed=3), project)


def test_failed_push_is_a_warning(project, make_dataset, tmp_path):
    root = Path(project["_root"])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "modify", "--local", "local", "url", str(blocker / "remote")],
        cwd=root,
        check=True,
    )
    result = ingest(make_dataset("unpushed"), project)
    assert result.status == "new" and result.data_version.git_commit == git(root, "rev-parse", "HEAD").strip()
    assert any("dvc push" in w for w in result.warnings), result.warnings


@pytest.mark.e2e
def test_round_trip_push_delete_pull(project, make_dataset):
    root = Path(project["_root"])
    result = ingest(make_dataset("roundtrip", n=8), project)
    manifest = (result.task_dir / "manifest.csv").read_bytes()
    remote = root / ".deltapatch" / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "dvc push filled the remote"
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(result.task_dir)
    pull_data(project)
    assert (result.task_dir / "manifest.csv").read_bytes() == manifest
    for row in read_manifest(result.task_dir).itertuples():
        assert file_sha256(result.task_dir / row.path) == row.sha256
    assert git(root, "status", "--porcelain") == ""


@pytest.mark.e2e
def test_checkout_fetches_from_remote_when_cache_is_gone(project, make_dataset, image_writer):
    root = Path(project["_root"])
    path = make_dataset("fetched")
    v1 = ingest(path, project)
    manifest_v1 = (v1.task_dir / "manifest.csv").read_bytes()
    image_writer(path / "a" / "img1.png", 31337)
    ingest(path, project)
    shutil.rmtree(root / ".dvc" / "cache")
    checkout(project, v1.data_version.git_commit)
    assert (v1.task_dir / "manifest.csv").read_bytes() == manifest_v1


@pytest.mark.e2e
def test_concurrent_ingests(project, make_dataset):
    root = Path(project["_root"])
    inputs = [make_dataset(f"conc-{i}", seed=10 + i, n=8) for i in range(2)]
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from deltapatch.config import load_params
        from deltapatch.data.ingest import ingest
        result = ingest(sys.argv[1], load_params(Path(sys.argv[2])))
        print(json.dumps({"status": result.status, "version": str(result.data_version)}))
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for path in inputs
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
        assert json.loads(out)["status"] == "new"
    assert {v.task for v in list_versions(project)[:2]} == {"conc-0", "conc-1"}
    assert git(root, "status", "--porcelain") == ""
    git(root, "fsck", "--no-progress")
    for name in ("conc-0", "conc-1"):  # HEAD's data.dvc holds both tasks: nothing was lost
        assert (root / "data" / "tasks" / name / "manifest.csv").is_file()
    subprocess.run([sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=root, check=True)
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "data.dvc"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert json.loads(status.stdout or "{}") == {}


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli(monkeypatch):
    """Invoke the real `deltapatch` app (every command module registered, the top-level callback run)
    in a project folder; what the callback's quiet mode sets in this process is restored after."""
    import os
    import warnings

    from typer.testing import CliRunner

    from deltapatch.cli import app
    from deltapatch.cli.errors import QUIET_ENV
    from deltapatch.telemetry import QUIETED_MARKER

    for key in (*QUIET_ENV, QUIETED_MARKER):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.delenv("DELTAPATCH_PROJECT", raising=False)
    runner = CliRunner()

    def invoke(cwd: Path, *args: str):
        monkeypatch.chdir(cwd)
        return runner.invoke(app, list(args))

    return invoke


def test_cli_ingest_versions_checkout(cli, project, make_dataset, tmp_path):
    root = Path(project["_root"])
    path = make_dataset("cli-task")
    first = cli(root, "ingest", str(path), "--json")
    assert first.exit_code == 0, first.output
    version = json.loads(first.output)["data_version"]["id"]
    again = cli(root / "data", "ingest", str(path))  # the project is found from a sub-folder
    assert again.exit_code == 0 and "unchanged" in again.output
    listed = cli(root, "data", "versions", "cli-task")
    assert listed.exit_code == 0 and version in listed.output
    restored = cli(root, "data", "checkout", version)
    assert restored.exit_code == 0 and f"restored to {version}" in " ".join(restored.output.split())
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"junk")
    refused = cli(root, "ingest", str(bad))
    assert refused.exit_code == 2 and "not a readable zip archive" in " ".join(refused.output.split())


def test_cli_data_init(cli, tmp_path):
    root = fresh_project(tmp_path)
    result = cli(root, "data", "init")
    assert result.exit_code == 0, result.output
    assert (root / "data.dvc").is_file()
    assert load_params(root)["data"]["root"] == "data"


def test_params_data_section_matches_settings():
    import dataclasses

    import yaml

    from deltapatch.data.versioning import DataSettings

    keys = set(yaml.safe_load(PARAMS.read_text())["data"])
    assert keys == {f.name for f in dataclasses.fields(DataSettings)}
