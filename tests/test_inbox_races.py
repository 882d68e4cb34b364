"""The inbox loses no dataset to a race: two submits of one name at once both arrive, and a run's
release takes out only the dataset that run claimed (security issue, items 2 and 3)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from deltapatch.config import state_dir
from deltapatch.inbox import EMITTED_FILE, InboxWatcher, inbox_dir, release, signature, submit
from tests.conftest import make_project


@pytest.fixture
def params(tmp_path: Path) -> dict[str, Any]:
    return make_project(tmp_path / "project")


def _dataset(folder: Path, marker: str, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "0.png").write_bytes(b"not decoded by the inbox")
    (folder / "marker.txt").write_text(marker)
    return folder


def _emitted(params: dict[str, Any]) -> dict[str, Any]:
    path = state_dir(params) / EMITTED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _markers(inbox: Path) -> list[str]:
    """The marker of every dataset in the inbox (its own entries and per-arrival folders)."""
    found = [p.read_text() for p in inbox.rglob("marker.txt")]
    found += [p.read_text() for p in inbox.rglob("birds.zip") if p.is_file()]
    return sorted(found)


def _hidden_copies(inbox: Path) -> list[Path]:
    return [p for p in inbox.iterdir() if p.name.startswith(".incoming-")]


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_concurrent_submits_of_one_name_all_arrive_and_leave_no_hidden_copy(
        params: dict[str, Any], tmp_path: Path, kind: str) -> None:
    inbox = inbox_dir(params)
    sources = []
    for i in range(4):
        if kind == "folder":
            sources.append(_dataset(tmp_path / f"user{i}" / "birds", f"dataset {i}"))
        else:
            archive = tmp_path / f"user{i}" / "birds.zip"
            archive.parent.mkdir(parents=True)
            archive.write_text(f"dataset {i}")
            sources.append(archive)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(sources))

    def one(source: Path) -> None:
        try:
            barrier.wait()
            results.append(submit(params, source, "birds", announce=False))
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    # Another process (a watcher recording its claim) holds the inbox lock while all four copies are
    # made: every submit finishes copying before any of them takes the name.
    lock = FileLock(str(state_dir(params) / EMITTED_FILE) + ".lock", timeout=60)
    with lock:
        threads = [threading.Thread(target=one, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        wanted = sorted(signature(s) for s in sources)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            copies = _hidden_copies(inbox)
            try:
                if sorted(signature(c) for c in copies) == wanted:
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            pytest.fail(f"the four copies were not made: {_hidden_copies(inbox)}")
    for t in threads:
        t.join(timeout=60)
    assert errors == [], f"a submit failed: {errors!r}; left behind: {[p.name for p in _hidden_copies(inbox)]}"
    paths = sorted(r["path"] for r in results)
    assert len(set(paths)) == 4, f"two submits got the same inbox path (one replaced the other): {paths}"
    assert _markers(inbox) == [f"dataset {i}" for i in range(4)], "0 datasets lost"
    assert all(Path(p).name == Path(sources[0]).name for p in paths), "each copy keeps the submitted name"
    assert _hidden_copies(inbox) == [], "no .incoming-* copy left behind"
    assert len(_emitted(params)) == 4, "each arrival is remembered as announced"
    for p in paths:
        assert release(params, p)
    assert list(inbox.iterdir()) == [] and _emitted(params) == {}


def test_a_corrected_dataset_submitted_after_the_run_quarantined_the_first_survives_that_runs_release(
        params: dict[str, Any], tmp_path: Path) -> None:
    from deltapatch.data.ingest import ingest
    from deltapatch.errors import DatasetError

    inbox = inbox_dir(params)
    first = submit(params, _dataset(tmp_path / "monday" / "birds", "monday"), announce=False)  # the run's claim
    # The run: ingest rejects the undecodable images and moves the arrival to data/quarantine/ …
    with pytest.raises(DatasetError):
        ingest(first["path"], params, task="birds")
    assert not Path(first["path"]).exists()
    # … the user submits a corrected dataset under the same name before the run has ended …
    second = submit(params, _dataset(tmp_path / "tuesday" / "birds", "tuesday", ("a", "b", "c")), announce=False)
    assert second["path"] == first["path"], "the name was free again"
    # … and the first run ends: its release must not take the corrected dataset with it.
    assert release(params, first["path"]) is False
    assert _markers(inbox) == ["tuesday"], "0 datasets lost: the corrected dataset is still in the inbox"
    assert "birds" in _emitted(params), "… and still remembered as announced (its own run is on its way)"
    emitted: list[Path] = []
    watcher = InboxWatcher(params, stable_seconds=0.1, emit=lambda p, t: emitted.append(p))
    deadline = time.monotonic() + 0.4
    while time.monotonic() < deadline:
        watcher.poll()
        time.sleep(0.05)
    assert emitted == [], "not announced a second time"
    assert release(params, second["path"]) is True, "its own run's release takes it out"
    assert list(inbox.iterdir()) == [] and _emitted(params) == {}


@pytest.mark.parametrize("announced_first", [False, True], ids=["release-before-watcher", "watcher-before-release"])
def test_a_dataset_replaced_by_hand_while_the_run_trains_is_left_for_its_own_run(
        params: dict[str, Any], tmp_path: Path, announced_first: bool) -> None:
    inbox = inbox_dir(params)
    first = submit(params, _dataset(tmp_path / "monday" / "birds", "monday"), announce=False)
    announced: list[Path] = []
    watcher = InboxWatcher(params, stable_seconds=0.1, emit=lambda p, t: announced.append(p))

    def watch(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            watcher.poll()
            time.sleep(0.05)

    watch(0.3)
    assert announced == [], "the submitted arrival is not announced twice"
    # While the run trains, the user swaps in a corrected dataset under the same name.
    shutil.rmtree(first["path"])
    shutil.copytree(_dataset(tmp_path / "tuesday" / "birds", "tuesday", ("a", "b", "c")), first["path"])
    if announced_first:
        watch(0.4)
        assert announced == [Path(first["path"])], "the corrected dataset gets its own announcement"
    assert release(params, first["path"]) is False, "the first run ends: its dataset is gone already"
    assert _markers(inbox) == ["tuesday"], "0 datasets lost"
    watch(0.4)
    assert announced == [Path(first["path"])], "announced exactly once, for its own run"
    assert release(params, first["path"]) is True, "its own run's release takes it out"
    assert list(inbox.iterdir()) == [] and _emitted(params) == {}


def test_a_second_submit_while_the_first_runs_gets_its_own_folder_and_outlives_the_first_release(
        params: dict[str, Any], tmp_path: Path) -> None:
    inbox = inbox_dir(params)
    first = submit(params, _dataset(tmp_path / "monday" / "birds", "monday"), announce=False)
    second = submit(params, _dataset(tmp_path / "tuesday" / "birds", "tuesday"), announce=False)
    assert Path(second["path"]).parent.name.startswith(".arrival-") and Path(second["path"]).name == "birds"
    assert release(params, first["path"]) is True
    assert _markers(inbox) == ["tuesday"], "0 datasets lost"
    assert release(params, second["path"]) is True
    assert list(inbox.iterdir()) == [] and _emitted(params) == {}


def test_a_submit_that_fails_while_copying_leaves_no_hidden_copy(params: dict[str, Any], tmp_path: Path) -> None:
    source = _dataset(tmp_path / "birds", "monday")
    os.mkfifo(source / "a" / "pipe")  # shutil refuses to copy a named pipe: the copy fails half-way
    with pytest.raises(shutil.Error, match="named pipe"):
        submit(params, source, announce=False)
    assert list(inbox_dir(params).iterdir()) == [], "no .incoming-* copy (nor anything else) left behind"
    assert _emitted(params) == {}
