"""Patch files: safetensors + json round trip, fingerprint refusal, malformed input."""

from __future__ import annotations

import json

import pytest
import torch

from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.patch import (
    META_FILE,
    TENSORS_FILE,
    PatchMeta,
    load_patch,
    patch_bytes,
    read_patch_meta,
    save_patch,
)
from deltapatch.errors import FingerprintMismatch, PatchFormatError
from tests.delta.conftest import perturb, random_base


def _meta(net: DeltaNetwork, task: str, kind: str) -> PatchMeta:
    return PatchMeta(task=task, class_names=["a", "b", "c"], delta_kind=kind, delta_config=net.task_configs[task].to_dict(),
                     base_arch="resnet18", base_fingerprint=net.base_fingerprint, input_size=32,
                     mean=[0.5] * 3, std=[0.5] * 3, metrics={"patch_acc": 0.5}, data_version="abc")


@pytest.mark.parametrize(("kind", "options"), [("channel", {}), ("lowrank", {"rank": 3}), ("lowrank", {"budget_pct": 2.0})])
@torch.no_grad()
def test_save_load_round_trip_reproduces_outputs(tmp_path, images, kind, options):
    source = DeltaNetwork(random_base())
    source.add_task("shapes", 3, make_config(kind, options))
    perturb(source.task_parameters("shapes"))
    source.model.layer1[0].bn1.per_task["shapes"].running_mean.fill_(0.3)  # buffers travel too
    expected = source.select("shapes")(images)
    save_patch(source, _meta(source, "shapes", kind), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [META_FILE, TENSORS_FILE]
    assert patch_bytes(tmp_path) == sum(p.stat().st_size for p in tmp_path.iterdir())

    target = DeltaNetwork(random_base())  # same seed → same base, same fingerprint
    meta = load_patch(target, tmp_path)
    assert meta.task == "shapes" and meta.delta_kind == kind
    assert meta.delta_config == source.task_configs["shapes"].to_dict()  # per-layer ranks included
    assert target.task_configs["shapes"] == source.task_configs["shapes"]
    assert torch.equal(target.select("shapes")(images), expected)
    assert read_patch_meta(tmp_path).metrics == {"patch_acc": 0.5}


def test_loading_onto_another_base_is_refused_naming_both_fingerprints(tmp_path):
    source = DeltaNetwork(random_base(seed=0))
    source.add_task("shapes", 3, make_config("channel"))
    save_patch(source, _meta(source, "shapes", "channel"), tmp_path)
    other = DeltaNetwork(random_base(seed=1))
    with pytest.raises(FingerprintMismatch) as error:
        load_patch(other, tmp_path)
    message = str(error.value)
    assert source.base_fingerprint[:19] in message and other.base_fingerprint[:19] in message
    assert other.tasks == []


def test_malformed_patches_give_clear_errors(tmp_path):
    net = DeltaNetwork(random_base())
    with pytest.raises(PatchFormatError, match="patch.json not found"):
        load_patch(net, tmp_path)
    net.add_task("shapes", 3, make_config("channel"))
    save_patch(net, _meta(net, "shapes", "channel"), tmp_path)
    net.remove_task("shapes")
    (tmp_path / TENSORS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(PatchFormatError, match="cannot read tensors"):
        load_patch(net, tmp_path)
    assert net.tasks == []
    data = json.loads((tmp_path / META_FILE).read_text())
    del data["base_fingerprint"]
    (tmp_path / META_FILE).write_text(json.dumps(data))
    with pytest.raises(PatchFormatError, match="missing fields"):
        read_patch_meta(tmp_path)


def test_tensors_that_do_not_fit_are_refused(tmp_path):
    net = DeltaNetwork(random_base())
    net.add_task("shapes", 3, make_config("lowrank", {"rank": 2}))
    meta = _meta(net, "shapes", "lowrank")
    meta.delta_config = {"rank": 5}  # claims another rank than the tensors have
    save_patch(net, meta, tmp_path)
    net.remove_task("shapes")
    with pytest.raises(PatchFormatError.__mro__[1], match="has shape"):
        load_patch(net, tmp_path)
    assert net.tasks == []
