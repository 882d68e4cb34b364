"""Reading the registry back, against a real sqlite store: every page of a large registry, only the
`<prefix>` models, names checked again, and a version refused when its patch names another task."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltapatch.errors import RegistryError
from tests.registry.conftest import TASK, Trained, direct_predictions, register


def _images(trained: Trained, n: int = 6) -> np.ndarray:
    return trained.data.test.images[:n].permute(0, 2, 3, 1).contiguous().numpy()


def _client(params: dict[str, Any]) -> Any:
    from mlflow.tracking import MlflowClient

    from deltapatch.registry.tracking import configure

    uri = configure(params)
    return MlflowClient(uri, uri)


def _insert_model_names(params: dict[str, Any], names: list[str]) -> None:
    """Registered models (names only, no versions) written in one transaction of MLflow's own store:
    what `create_registered_model` writes, without a commit per name (1,000 of those take ~15 s)."""
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from deltapatch.registry.tracking import configure

    now = int(time.time() * 1000)
    registry = SqlAlchemyStore(configure(params))
    with registry.ManagedSessionMaker(read_only=False) as session:
        session.add_all([SqlRegisteredModel(name=n, creation_time=now, last_updated_time=now) for n in names])


def _champion_copy(client: Any, name: str, of: Any) -> int:
    """Model `name` with one version pointing at the artifacts of version `of` (no upload), as champion."""
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=of.source, run_id=of.run_id, tags=dict(of.tags or {}),
                                     model_id=getattr(of, "model_id", None))
    client.set_registered_model_alias(name, "champion", str(mv.version))
    return int(mv.version)


def test_reads_follow_every_page_and_keep_serving_past_1000_models(reg_project: dict[str, Any], trained: Trained,
                                                                   base_project: dict[str, Any]) -> None:
    """Issue item 6: past 1,000 registered models the champions were read from the first page only,
    and `serve` unloaded the tasks it no longer saw."""
    from deltapatch.models.base import load_base
    from deltapatch.registry import registry as R
    from deltapatch.registry.bases import list_bases, serving_set
    from deltapatch.registry.runtime import Predictor
    from deltapatch.serve import ChampionSync

    params = reg_project
    first = trained.results[0]
    R.promote(params, TASK, register(params, first), reason="paging")
    sync = ChampionSync(params, Predictor(load_base(params)))
    assert sync.refresh() == {TASK: 1}

    # 1,000 other models, sorting before `deltapatch-`: MLflow's first (largest) page holds only them
    _insert_model_names(params, [f"aaa-other-{i:04d}" for i in range(1000)])
    assert sync.refresh() == {TASK: 1}, f"the served patch was unloaded (refused: {sync.refused})"
    assert set(R.champions(params)) == {TASK}
    assert {r["task"] for r in R.list_patches(params)} == {TASK}

    # more deltapatch models than one page holds: every page is read
    client = _client(params)
    source = client.get_model_version(f"deltapatch-{TASK}", "1")
    extra = [f"paged-{i}" for i in range(5)]
    for task in extra:
        _champion_copy(client, f"deltapatch-{task}", source)
    params["registry"]["page_size"] = 2
    assert set(R.champions(params)) == {TASK, *extra}
    assert {r["task"] for r in R.list_patches(params)} == {TASK, *extra}
    assert set(serving_set(params).tasks) == {TASK, *extra}
    for _ in range(3):  # base versions are paged too: find_base_version sees every one
        client.create_model_version("deltapatch-base", source=source.source, tags={"kind": "base"})
    assert R.find_base_version(params, first.meta.base_fingerprint) == 1
    assert [b.version for b in list_bases(params)] == [1]


def test_version_whose_patch_names_another_task_is_refused(reg_project: dict[str, Any], trained: Trained,
                                                           base_project: dict[str, Any]) -> None:
    """Issue item 7: a version registered as task 'evil' whose patch.json names 'shapes' replaced the
    served 'shapes' patch. Built legitimately: the 'shapes' patch registered under another task's name."""
    import mlflow

    from deltapatch.models.base import load_base
    from deltapatch.registry import registry as R
    from deltapatch.registry.runtime import Predictor
    from deltapatch.serve import ChampionSync

    params = reg_project
    first, second = trained.results
    images = _images(trained)
    R.promote(params, TASK, register(params, first), reason="the real one")
    sync = ChampionSync(params, Predictor(load_base(params)))
    assert sync.refresh() == {TASK: 1}
    served = sync.predictor.predict(images, TASK)

    impostor = dataclasses.replace(second, task="evil", meta=dataclasses.replace(second.meta, task="evil"))
    version = register(params, impostor)  # model deltapatch-evil; its patch.json still names 'shapes'
    assert R.get_version(params, "evil", version=version)["model_name"] == "deltapatch-evil"
    R.promote(params, "evil", version, reason="impostor")

    assert sync.refresh() == {TASK: 1}
    loaded = sync.predictor.patches[TASK]
    assert loaded.info["model_name"] == f"deltapatch-{TASK}", "a version of deltapatch-evil replaced 'shapes'"
    assert "evil" not in sync.predictor.patches
    assert "registered for task 'evil'" in sync.refused["evil"] and "names task 'shapes'" in sync.refused["evil"]
    after = sync.predictor.predict(images, TASK)
    assert [r["class"] for r in after] == [r["class"] for r in served]
    assert [r["score"] for r in after] == pytest.approx([r["score"] for r in served], abs=1e-6)
    assert [r["class"] for r in after] == [r["class"] for r in direct_predictions(base_project, first.patch_dir, images)]

    with pytest.raises(RegistryError, match=r"deltapatch-evil version 1 is registered for task 'evil', but its patch.json names task 'shapes'"):
        R.download_patch(params, "evil")
    # the runtime refuses it too, told the task by the caller or by the version's info
    with pytest.raises(RegistryError, match="names task 'shapes'"):
        sync.predictor.add_patch(second.patch_dir, version="1", info={"task": "evil", "model_name": "deltapatch-evil"})
    with pytest.raises(RegistryError, match="names task 'shapes'"):
        sync.predictor.add_patch(second.patch_dir, task="evil")
    assert sync.predictor.patches[TASK].info["model_name"] == f"deltapatch-{TASK}"
    # and so does the registered pyfunc model (its model_config names the task it was registered for)
    with pytest.raises(Exception, match="names task 'shapes'"):
        mlflow.pyfunc.load_model(f"models:/deltapatch-evil/{version}")


def test_task_names_read_from_the_registry_are_checked_again(reg_project: dict[str, Any], trained: Trained,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """Issue item 8: `deltapatch-shapes\\n` passed the `$` check, and names read back were not
    checked at all. Such models are skipped with a warning (reading.valid_registry_task)."""
    from deltapatch.registry import registry as R
    from deltapatch.registry.bases import serving_set

    params = reg_project
    R.promote(params, TASK, register(params, trained.results[0]), reason="valid")
    client = _client(params)
    source = client.get_model_version(f"deltapatch-{TASK}", "1")
    bad = [f"deltapatch-{TASK}\n", "deltapatch-Bad_Name", "deltapatch-trailing-"]
    for name in bad:
        _champion_copy(client, name, source)
    base = client.get_registered_model("deltapatch-base")
    base_v = max(int(m.version) for m in client.search_model_versions("name='deltapatch-base'"))
    client.set_model_version_tag(base.name, str(base_v), "release", '{"shapes": 1, "Bad_Name": 1, "x\\n": 1}')
    client.set_registered_model_alias(base.name, "champion", str(base_v))

    with caplog.at_level(logging.WARNING, logger="deltapatch.registry"):
        assert set(R.champions(params)) == {TASK}
        assert {r["task"] for r in R.list_patches(params)} == {TASK}
        view = serving_set(params)
    assert set(view.tasks) == {TASK} and view.unavailable == {}
    for name in bad:
        assert any(repr(name) in m and "invalid" in m for m in caplog.messages), (name, caplog.messages)
    with pytest.raises(RegistryError, match="invalid task name"):
        R.get_version(params, f"{TASK}\n", version=1)
    with pytest.raises(RegistryError, match="invalid task name"):
        R.download_patch(params, "Bad_Name", version=1)
    assert Path(R.download_patch(params, TASK) / "patch.json").is_file()
