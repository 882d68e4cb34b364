"""The inbox: `submit` copies atomically; the watcher announces each complete dataset exactly once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from deltapatch.inbox import InboxWatcher, inbox_dir, submit
from tests.conftest import make_project


@pytest.fixture
def params(tmp_path: Path) -> dict[str, Any]:
    return make_project(tmp_path / "project")


def _dataset(folder: Path, classes: tuple[str, ...] = ("a", "b")) -> Path:
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "0.png").write_bytes(b"not decoded by the inbox")
    return folder


def _poll_until(watcher: InboxWatcher, seconds: float) -> list[Path]:
    announced: list[Path] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        announced += watcher.poll()
        time.sleep(0.05)
    return announced


def test_watcher_announces_a_stable_folder_once(params: dict[str, Any]) -> None:
    emitted: list[tuple[Path, str | None]] = []
    watcher = InboxWatcher(params, stable_seconds=0.2, emit=lambda p, t: emitted.append((p, t)))
    dropped = _dataset(inbox_dir(params) / "cats")
    assert watcher.poll() == [], "a folder seen for the first time is not yet known to be complete"
    _poll_until(watcher, 0.6)
    assert emitted == [(dropped, None)]
    # A restarted watcher remembers what was announced.
    again = InboxWatcher(params, stable_seconds=0.2, emit=lambda p, t: emitted.append((p, t)))
    _poll_until(again, 0.6)
    assert len(emitted) == 1


def test_watcher_ignores_partial_and_hidden_names(params: dict[str, Any]) -> None:
    emitted: list[Path] = []
    watcher = InboxWatcher(params, stable_seconds=0.1, emit=lambda p, t: emitted.append(p))
    inbox = inbox_dir(params)
    (inbox / "upload.zip.part").write_bytes(b"half an archive")
    _dataset(inbox / ".incoming-1234")
    _poll_until(watcher, 0.4)
    assert emitted == []


def test_watcher_retries_an_announcement_that_failed(params: dict[str, Any]) -> None:
    calls: list[Path] = []

    def flaky(path: Path, task: str | None) -> None:
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("server busy")

    watcher = InboxWatcher(params, stable_seconds=0.1, emit=flaky)
    _dataset(inbox_dir(params) / "dogs")
    watcher.poll()
    time.sleep(0.15)
    with pytest.raises(RuntimeError, match="server busy"):
        watcher.poll()
    assert _poll_until(watcher, 0.3) == [inbox_dir(params) / "dogs"]
    assert len(calls) == 2


def test_submit_copies_into_the_inbox_and_the_watcher_does_not_announce_it_again(
        params: dict[str, Any], tmp_path: Path) -> None:
    source = _dataset(tmp_path / "birds")
    first = submit(params, source, "birds", announce=False)
    second = submit(params, source, "birds", announce=False)
    assert Path(first["path"]) == inbox_dir(params) / "birds"
    assert Path(second["path"]) != Path(first["path"]), "a second arrival of the same name gets its own folder"
    assert Path(second["path"]).name == "birds" and second["task"] == "birds", "… and keeps the submitted name"
    assert sorted(p.name for p in Path(first["path"]).iterdir()) == ["a", "b"]
    assert source.exists(), "submit copies; the user's dataset stays where it was"
    emitted: list[Path] = []
    watcher = InboxWatcher(params, stable_seconds=0.1, emit=lambda p, t: emitted.append(p))
    _poll_until(watcher, 0.4)
    assert emitted == []


def test_submit_refuses_a_missing_path_naming_it(params: dict[str, Any], tmp_path: Path) -> None:
    from deltapatch.errors import DatasetError

    with pytest.raises(DatasetError, match="nowhere: no such file or folder"):
        submit(params, tmp_path / "nowhere", announce=False)


def test_release_takes_an_ended_arrival_out_of_the_inbox_and_never_touches_other_folders(
        params: dict[str, Any], tmp_path: Path) -> None:
    from deltapatch.inbox import release

    source = _dataset(tmp_path / "fish")
    first = Path(submit(params, source, announce=False)["path"])
    second = Path(submit(params, source, announce=False)["path"])
    assert release(params, second) and not second.parent.exists(), "the per-arrival folder goes too"
    assert release(params, first) and list(inbox_dir(params).iterdir()) == []
    assert not release(params, source) and source.is_dir(), "a path outside the inbox is left alone"
    assert Path(submit(params, source, announce=False)["path"]) == inbox_dir(params) / "fish", "the name is free again"
