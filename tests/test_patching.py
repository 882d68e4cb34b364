"""train_patch end to end on a real (briefly pre-trained) base: learns, base route untouched."""

from __future__ import annotations

import torch

from deltapatch.data.sources import builtin_task
from deltapatch.delta import DeltaNetwork
from deltapatch.delta.patch import load_patch, read_patch_meta
from deltapatch.evaluate import task_accuracy
from deltapatch.models.base import load_base
from deltapatch.patching import open_session, train_patch
from deltapatch.train import predict_logits


def test_trained_patch_learns_keeps_base_exact_and_reloads(project, tmp_path):
    data = builtin_task(project, "shapes", per_class=40)
    session = open_session(project)
    result = train_patch(project, data, out_dir=tmp_path / "patch", session=session, epochs=8, progress=False,
                         data_version="v1")
    chance = 1 / data.num_classes
    assert result.metrics["patch_acc"] > chance + 0.2
    assert result.base_check.bit_identical and result.metrics["base_logits_max_abs_diff"] == 0.0
    assert result.metrics["base_acc_change"] == 0.0
    assert 0 < result.metrics["trainable_pct"] < 3  # params.yaml: delta.budget_pct 3
    meta = read_patch_meta(result.patch_dir)
    assert meta.delta_config == session.net.task_configs["shapes"].to_dict()
    assert meta.delta_config["budget_pct"] == 3 and len(meta.delta_config["ranks"]) == 20  # the allocated ranks
    assert meta.data_version == "v1" and meta.class_names == data.class_names
    assert meta.metrics["patch_bytes"] == sum(p.stat().st_size for p in result.patch_dir.iterdir())

    # A fresh process: load the base from disk, load the patch file, same test accuracy.
    fresh = DeltaNetwork(load_base(project).model)
    load_patch(fresh, result.patch_dir)
    assert task_accuracy(fresh, "shapes", data.test, session.norm) == result.metrics["patch_acc"]
    fresh.select("base")
    assert torch.equal(predict_logits(fresh, session.base_data.test, session.norm), session.reference_logits)
