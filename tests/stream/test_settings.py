"""Stream settings, task names and the MLflow switch: the checks that run before any training."""

from __future__ import annotations

import pytest

from deltapatch.config import ConfigError
from deltapatch.errors import DeltapatchError
from deltapatch.stream.settings import StreamSettings


def test_quick_overrides_merge_strategy_options() -> None:
    settings = StreamSettings(epochs=6, strategy_options={"replay": {"lr": 0.001, "mem_per_task": 50}},
                              quick={"epochs": 1, "strategy_options": {"replay": {"mem_per_task": 5}}})
    quick = settings.for_run(quick=True)
    assert quick.epochs == 1 and quick.strategy_options["replay"] == {"lr": 0.001, "mem_per_task": 5}
    assert settings.for_run(quick=False) is settings
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochz'\] in stream.quick"):
        StreamSettings(quick={"epochz": 1}).for_run(quick=True)


def test_bad_task_names_fail_with_the_fix(project, tmp_path) -> None:  # noqa: ANN001
    from deltapatch.data.sources import resolve_task
    from deltapatch.stream.runner import _check_stream

    with pytest.raises(DeltapatchError, match="unknown task 'street-signs'.*deltapatch ingest PATH --task street-signs"):
        resolve_task(project, "street-signs", tmp_path)
    with pytest.raises(DeltapatchError, match="'digits' is the base task"):
        _check_stream(project, ["glyphs", "digits"])
    with pytest.raises(DeltapatchError, match=r"\['glyphs'\] appear more than once"):
        _check_stream(project, ["glyphs", "shapes", "glyphs"])
    assert resolve_task(project, "shapes", tmp_path).num_classes == 5


def test_ingested_task_names_are_loaded_from_data_tasks(project, tmp_path) -> None:  # noqa: ANN001
    """A folder data/tasks/<name>/ with a manifest (what `deltapatch ingest` writes) is a stream task."""
    from PIL import Image

    from deltapatch.data.sources import resolve_task

    folder = tmp_path / "data" / "tasks" / "blobs"
    rows = ["path,class,split,sha256"]
    for i in range(12):
        cls, split = ("dark", "light")[i % 2], ("train", "val", "test")[i % 3]
        path = f"images/{cls}/{i}.png"
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (20 + i, 20, 20) if cls == "dark" else (230, 230 - i, 230)).save(folder / path)
        rows.append(f"{path},{cls},{split},x")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    data = resolve_task({**project, "_root": str(tmp_path)}, "blobs", tmp_path / "work")
    assert data.name == "blobs" and data.class_names == ["dark", "light"] and len(data.train) == 4


def test_tracking_uri_is_used_only_when_configured(project, monkeypatch) -> None:  # noqa: ANN001
    from deltapatch.stream.tracking import configured_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert configured_tracking_uri(project) is None  # no env, no running stack: nothing is logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert configured_tracking_uri(project) == "sqlite:///env.db"
    assert configured_tracking_uri(project, "sqlite:///explicit.db") == "sqlite:///explicit.db"
