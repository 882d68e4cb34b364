"""A task's data at a recorded data version, with real git + DVC: the working copy when it holds
that version, otherwise an export read from the DVC cache or the remote — the working copy untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deltapatch.data.ingest import file_sha256, ingest
from deltapatch.data.task_data import task_data_at
from deltapatch.data.versioning import VersioningError, git


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_working_copy_is_used_when_it_holds_the_version(project, make_dataset):
    v1 = ingest(make_dataset("same"), project)
    folder = task_data_at(project, "same", str(v1.data_version), v1.manifest_sha256)
    assert folder == v1.task_dir
    assert not (Path(project["_root"]) / ".deltapatch" / "exports").exists()


def test_a_reingested_task_is_exported_at_its_old_version_and_the_working_copy_is_untouched(
        project, make_dataset, image_writer):
    root = Path(project["_root"])
    path = make_dataset("moved")
    v1 = ingest(path, project)
    v1_files = _folder_bytes(v1.task_dir)
    image_writer(path / "a" / "extra.png", 4242)
    v2 = ingest(path, project)
    assert v2.manifest_sha256 != v1.manifest_sha256
    working = _folder_bytes(v2.task_dir)

    folder = task_data_at(project, "moved", str(v1.data_version), v1.manifest_sha256)
    assert folder != v1.task_dir and folder.is_relative_to(root / ".deltapatch" / "exports")
    assert file_sha256(folder / "manifest.csv") == v1.manifest_sha256
    assert _folder_bytes(folder) == v1_files
    assert _folder_bytes(v2.task_dir) == working, "the working copy keeps the newer version"
    assert git(root, "status", "--porcelain") == ""
    assert task_data_at(project, "moved", str(v1.data_version), v1.manifest_sha256) == folder, "reused"


@pytest.mark.e2e
def test_a_clone_without_cache_or_data_gets_the_version_from_the_remote(project, make_dataset):
    root = Path(project["_root"])
    v1 = ingest(make_dataset("remote", n=8), project)
    expected = _folder_bytes(v1.task_dir)
    shutil.rmtree(root / ".dvc" / "cache")
    shutil.rmtree(v1.task_dir)  # a second machine: no cache, no data/tasks/<task>
    folder = task_data_at(project, "remote", str(v1.data_version), v1.manifest_sha256)
    assert _folder_bytes(folder) == expected
    assert not v1.task_dir.exists(), "the working copy is not restored, only the export is written"


def test_an_unknown_version_is_a_clear_error(project, make_dataset):
    v1 = ingest(make_dataset("gone"), project)
    shutil.rmtree(v1.task_dir)
    with pytest.raises(VersioningError, match="no such git revision"):
        task_data_at(project, "gone", "0123456789ab:00.dir:0123456789ab", "0" * 64)


def test_a_version_of_another_task_is_refused(project, make_dataset):
    ingest(make_dataset("first"), project)
    other = ingest(make_dataset("second", seed=9), project)
    with pytest.raises(VersioningError, match="has no folder"):
        task_data_at(project, "nope", str(other.data_version), None, folder=Path(project["_root"]) / "missing")
