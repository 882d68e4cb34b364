"""stack.postgres_dir: deltapatch creates its PostgreSQL cluster only in a new, empty or own folder.

A folder holding anything else (the project itself, whose ``data/`` is the datasets) is refused
with the folder and the fix named, and nothing in it is touched. No PostgreSQL runs here: initdb is
replaced by a fake that records its calls (and, where a cluster should be made, writes PG_VERSION).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from deltapatch.config import ConfigError
from deltapatch.errors import DeltapatchError
from deltapatch.stack import postgres, stack_settings
from tests.conftest import make_project


@pytest.fixture
def initdb_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[list[str]]:
    """Fake binaries and initdb: every initdb command line is recorded; the fake makes a cluster."""
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        data = Path(cmd[cmd.index("-D") + 1])
        (data / "PG_VERSION").write_text("15\n")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(postgres, "bin_dir", lambda: tmp_path / "no-postgres-bin")
    monkeypatch.setattr(postgres, "_driver", lambda: object())
    monkeypatch.setattr(postgres, "check_reachable", lambda folder: None)  # pytest's temp folders are private
    monkeypatch.setattr(postgres, "_as_server_user", lambda: [])
    monkeypatch.setattr(postgres.subprocess, "run", fake_run)
    return calls


def cluster_in(tmp_path: Path, postgres_dir: str) -> tuple[dict[str, Any], postgres.Cluster]:
    params = make_project(tmp_path / "proj", {"stack": {"database": "postgres", "postgres_dir": postgres_dir}})
    return params, postgres.cluster(params, stack_settings(params))


def test_project_folder_as_postgres_dir_is_refused_and_its_data_kept(tmp_path, initdb_calls):
    params, c = cluster_in(tmp_path, ".")  # the project: its data/ holds the datasets, no PG_VERSION
    image = Path(params["_root"]) / "data" / "tasks" / "shapes" / "img0.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"user data")
    mode = c.folder.stat().st_mode
    error: DeltapatchError | None = None
    try:
        postgres.prepare(c)
    except DeltapatchError as exc:
        error = exc
    assert image.is_file() and image.read_bytes() == b"user data", "the project's data/ must survive"
    assert isinstance(error, ConfigError), repr(error)
    message = str(error)
    assert f"stack.postgres_dir: {c.folder} is not empty and holds no PostgreSQL cluster" in message
    assert "PG_VERSION" in message and "params.yaml" in message
    assert "set stack.postgres_dir in params.yaml to a new or empty folder" in (error.hint or "")
    assert initdb_calls == [], "initdb must not run"
    assert c.folder.stat().st_mode == mode, "the folder's mode is left alone"
    assert not (c.folder / postgres.INITDB_MARKER).exists()


@pytest.mark.parametrize("content", ["stray-file", "foreign-data"])
def test_folder_with_foreign_content_is_refused(tmp_path, initdb_calls, content):
    _, c = cluster_in(tmp_path, "pg")
    c.folder.mkdir()
    kept = c.folder / "notes.txt" if content == "stray-file" else c.data / "base" / "1"
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text("keep me")  # a data/ without PG_VERSION and without our initdb marker is not ours
    with pytest.raises(ConfigError, match="is not empty and holds no PostgreSQL cluster"):
        postgres.prepare(c)
    assert kept.read_text() == "keep me" and initdb_calls == []


@pytest.mark.parametrize("leftover", ["none", "empty-folder", "empty-data", "passfile-only", "interrupted-initdb"])
def test_new_empty_or_own_folder_gets_a_cluster(tmp_path, initdb_calls, leftover):
    _, c = cluster_in(tmp_path, "pg")
    if leftover != "none":
        c.folder.mkdir()
    if leftover == "empty-data":
        c.data.mkdir()
    elif leftover == "passfile-only":  # the user removed data/ to start over
        c.passfile.write_text("127.0.0.1:5432:*:deltapatch:old\n")
    elif leftover == "interrupted-initdb":  # our marker: the half-made data/ is ours to remove
        (c.folder / postgres.INITDB_MARKER).write_text("")
        (c.data / "base").mkdir(parents=True)
        (c.data / "base" / "junk").write_text("half-made")
    assert postgres.prepare(c) is True
    assert len(initdb_calls) == 1 and c.initialised and c.passfile.is_file()
    assert not (c.data / "base" / "junk").exists()
    assert not (c.folder / postgres.INITDB_MARKER).exists(), "removed once initdb succeeded"
    assert postgres.prepare(c) is False and len(initdb_calls) == 1, "an existing cluster is kept"
