"""The non-regression gate on real patches (trained for one epoch on tiny tasks)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltapatch import pipeline
from deltapatch.delta import DeltaNetwork
from deltapatch.delta.network import final_linear_name
from deltapatch.delta.patch import TENSORS_FILE
from deltapatch.gate import Champion, _task_data, run_gate
from deltapatch.models.base import load_base
from tests.flows.conftest import new_project, write_task


@pytest.fixture(scope="module")
def trained(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A project with two ingested tasks and a trained patch for each."""
    folder = tmp_path_factory.mktemp("gate-project")
    params = new_project(base_project, folder)
    src = tmp_path_factory.mktemp("gate-src")
    out = {"params": params}
    for name in ("shapes", "glyphs"):
        ingested = pipeline.ingest_step(params, write_task(src, name), name)
        out[name] = (ingested, pipeline.train_step(params, name, ingested.task_dir, ingested.data_version,
                                                   manifest_sha256=ingested.manifest_sha256))
    return out


def _champion(trained: dict[str, Any], acc: float | None = None) -> Champion:
    ingested, result = trained["glyphs"]
    return Champion("glyphs", "1", Path(result.patch_dir),
                    result.patch_acc if acc is None else acc, ingested.data_version)


def test_gate_passes_with_champion_beside(trained: dict[str, Any]) -> None:
    params = trained["params"]
    result = run_gate(params, None, "shapes", Path(trained["shapes"][1].patch_dir), [_champion(trained)])
    assert result.passed, result.message
    assert result.base_bit_identical
    names = [c.name for c in result.checks]
    assert names == ["base", "interference:glyphs", "patch_accuracy"]
    inter = result.check("interference:glyphs")
    assert inter.extra["reference_source"] == "registered" and inter.extra["drop"] == pytest.approx(0.0)
    assert "reproduced" in inter.detail


def test_gate_fails_below_min_accuracy_and_says_by_how_much(trained: dict[str, Any]) -> None:
    params = dict(trained["params"], gate={"min_patch_accuracy": 1.0, "interference_tolerance": 0.0})
    result = run_gate(params, None, "shapes", Path(trained["shapes"][1].patch_dir), [])
    acc = result.check("patch_accuracy").value
    assert acc < 1.0  # one epoch on 12 images per class
    assert not result.passed
    assert f"short by {1.0 - acc:.3f}" in result.message and "patch_accuracy" in result.message


def test_gate_fails_when_a_champions_saved_tensors_no_longer_reproduce_it(trained: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """A real regression: the champion's stored tensors changed after registration (a corrupted or
    tampered artifact). Its head is overwritten to always answer the rarest test class, so the
    recomputed accuracy must fall below the one it was registered with."""
    params = trained["params"]
    # The module's one-epoch champions can sit at chance (then no tampering could lower them): this
    # one gets a step budget, so that a constant answer is clearly worse than what it registered.
    ingested, _ = trained["glyphs"]
    strong = pipeline.train_step(dict(params, train={**params["train"], "min_steps": 60}), "glyphs",
                                 ingested.task_dir, ingested.data_version, manifest_sha256=ingested.manifest_sha256,
                                 out_dir=tmp_path / "trained" / "patch")
    champ = Champion("glyphs", "1", Path(strong.patch_dir), strong.patch_acc, ingested.data_version)
    shutil.copytree(champ.patch_dir, tmp_path / "patch")
    tensors = load_file(str(tmp_path / "patch" / TENSORS_FILE))
    head = final_linear_name(load_base(params).model)  # the head's tensors are '<its path>.weight/.bias'
    test_labels = _task_data(params, "glyphs").test.labels.tolist()
    rarest = min(set(test_labels), key=test_labels.count)
    constant_acc = test_labels.count(rarest) / len(test_labels)
    assert champ.test_acc > constant_acc + 0.1, f"the champion ({champ.test_acc:.3f}) must beat a constant answer"
    tensors[f"{head}.weight"] = torch.zeros_like(tensors[f"{head}.weight"])
    tensors[f"{head}.bias"] = torch.zeros_like(tensors[f"{head}.bias"])
    tensors[f"{head}.bias"][rarest] = 1.0
    save_file(tensors, str(tmp_path / "patch" / TENSORS_FILE))
    champ.patch_dir = tmp_path / "patch"

    result = run_gate(params, None, "shapes", Path(trained["shapes"][1].patch_dir), [champ])
    assert not result.passed
    assert [c.name for c in result.failed] == ["interference:glyphs"]
    inter = result.check("interference:glyphs")
    assert inter.value == pytest.approx(constant_acc)
    assert inter.extra["drop"] == pytest.approx(champ.test_acc - constant_acc)
    assert "DROPPED by" in result.message


def test_gate_fails_when_the_network_base_differs_in_one_weight(trained: dict[str, Any]) -> None:
    """A real regression of the base route: one frozen weight of the network being patched is off
    by 1e-3 (what a patch that leaked into the base would do); the pristine reference is the file."""
    params = trained["params"]
    net = DeltaNetwork(load_base(params).model)
    name, weight = next((n, p) for n, p in net.named_parameters() if p.dim() == 4)  # the first conv
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
    result = run_gate(params, net, "shapes", Path(trained["shapes"][1].patch_dir), [])
    assert [c.name for c in result.failed] == ["base"], name
    base = result.check("base")
    assert base.value > 0 and not base.extra["bit_identical"]
    assert "NOT bit-identical" in result.message
    assert result.as_dict()["passed"] is False


@pytest.mark.usefixtures("isolated_env")
def test_gate_step_gates_against_registered_champions_and_removes_their_download(
        trained: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    params = trained["params"]
    ingested, glyphs = trained["glyphs"]
    gate = pipeline.gate_step(params, "glyphs", glyphs.patch_dir)  # no champion yet
    registered = pipeline.register_step(params, glyphs, gate, ingested.data_version)
    pipeline.promote_step(params, "glyphs", registered.version)

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a downloaded champion would be left
    result = pipeline.gate_step(params, "shapes", trained["shapes"][1].patch_dir)
    assert [c.name for c in result.checks] == ["base", "interference:glyphs", "patch_accuracy"]
    assert result.check("interference:glyphs").extra["version"] == registered.version
    assert sorted(p.name for p in scratch.iterdir() if p.name.startswith("deltapatch-")) == []


def test_gate_accepts_a_bare_network_and_measures_it_against_a_fresh_base(trained: dict[str, Any]) -> None:
    params = trained["params"]
    net = DeltaNetwork(load_base(params).model)
    result = run_gate(params, net, "shapes", Path(trained["shapes"][1].patch_dir), [_champion(trained)])
    assert result.passed, result.message
    assert result.base_bit_identical
    assert net.tasks == ["glyphs", "shapes"]  # the network given is the one checked, left with both patches
    with pytest.raises(TypeError, match="PatchSession or DeltaNetwork"):
        run_gate(params, object(), "shapes", Path(trained["shapes"][1].patch_dir), [])
