"""Base model loading: safetensors and weights_only checkpoints, clear errors for bad files."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from deltapatch.config import ConfigError
from deltapatch.models.base import load_base, read_state_dict
from tests.conftest import make_project
from tests.delta.conftest import random_base


def _project(tmp_path, weights: str):
    return make_project(tmp_path, {"base": {"weights": weights}})


def test_loads_safetensors_and_pt_to_the_same_fingerprint(tmp_path):
    state = random_base().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    a = load_base(_project(tmp_path, "w.safetensors"))
    b = load_base(_project(tmp_path, "w.pt"))
    assert a.fingerprint == b.fingerprint
    assert a.class_names == [str(i) for i in range(10)]
    assert not any(p.requires_grad for p in a.model.parameters())


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_objects_are_refused_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"weight": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(ConfigError, match="cannot read weights safely"):
        read_state_dict(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_mismatched_weights_name_the_file_and_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found; run `deltapatch pretrain`"):
        load_base(_project(tmp_path, "nope.safetensors"))
    save_file({"fc.weight": torch.zeros(2, 3)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ConfigError, match="does not match base.arch 'resnet18'"):
        load_base(_project(tmp_path, "small.safetensors"))


def test_unknown_architecture_is_a_config_error(tmp_path):
    params = make_project(tmp_path, {"base": {"arch": "resnet9000"}})
    from deltapatch.models.base import base_settings, build_architecture

    with pytest.raises(ConfigError, match="not a torchvision model"):
        build_architecture(base_settings(params), 3)


def test_ensure_base_pretrains_the_embedded_default_once_and_names_a_missing_user_base(tmp_path):
    from deltapatch.models.pretrain import ensure_base

    params = make_project(tmp_path / "embedded", {"pretrain": {"epochs": 1}, "demo": {"images_per_class": 12}})
    said: list[str] = []
    path = ensure_base(params, progress=False, say=said.append)
    assert path.is_file() and load_base(params).fingerprint
    assert any("pre-training the embedded default" in line for line in said), said
    said.clear()
    assert ensure_base(params, progress=False, say=said.append) == path and said == [], "only once"

    mine = make_project(tmp_path / "mine", {"base": {"weights": "models/mine.pt", "eval_set": "data/base-eval"}})
    with pytest.raises(ConfigError, match=r"models/mine\.pt not found.*stopped before ingesting") as missing:
        ensure_base(mine, progress=False)
    assert "base.weights" in missing.value.hint and not (tmp_path / "mine" / "models").exists()
