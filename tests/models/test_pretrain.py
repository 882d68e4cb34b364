"""`deltapatch pretrain` refuses to save a base that learned nothing, and says what to change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deltapatch.models.pretrain import chance_accuracy
from tests.conftest import make_project


def test_chance_is_the_majority_class_rate():
    assert chance_accuracy(torch.tensor([0, 1, 1, 1, 2])) == pytest.approx(0.6)
    assert chance_accuracy(torch.tensor([], dtype=torch.long)) == 0.0


@pytest.mark.e2e
def test_pretrain_that_cannot_learn_refuses_to_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.cli import app

    make_project(tmp_path, {"pretrain": {"lr": 0.0, "epochs": 1, "batch_size": 256}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(os.environ, "DELTAPATCH_PROJECT", str(tmp_path))
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["pretrain"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "within 0.1 of chance" in message and "was NOT written" in message
    assert "pretrain.lr (now 0;" in message and "pretrain.epochs (now 1;" in message
    assert "pretrain.precise_bn_batches (now auto;" in message
    assert list(tmp_path.glob("models/*")) == []  # neither the weights nor their sidecar


def test_precise_batchnorm_replaces_stale_statistics_with_the_split_average():
    from torch import nn

    from deltapatch.data.dataset import Split
    from deltapatch.models.pretrain import precise_batchnorm
    from deltapatch.train import Normalizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.Dropout(0.5))
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    norm = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    precise_batchnorm(model, Split(images, torch.zeros(10, dtype=torch.long)), norm, batch_size=5)
    with torch.no_grad():
        features = model[0](norm(images))
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.01 and not model.training  # hyper-parameters and mode restored


@pytest.mark.parametrize(("arch", "slow"), [("resnet18", False), ("mobilenet_v3_small", True), ("efficientnet_b0", False),
                                            ("convnext_tiny", False)])
def test_auto_precise_batchnorm_only_for_nets_with_slow_batchnorm_averages(arch: str, slow: bool) -> None:
    from deltapatch.models.base import BaseSettings, build_architecture
    from deltapatch.models.pretrain import PretrainSettings, needs_precise_batchnorm

    model = build_architecture(BaseSettings(arch=arch), num_classes=10)
    assert needs_precise_batchnorm(model) is slow
    assert PretrainSettings().precise_batches(model) == (None if slow else 0)  # None: every training batch
    assert PretrainSettings(precise_bn_batches=0).precise_batches(model) == 0
    assert PretrainSettings(precise_bn_batches=7).precise_batches(model) == 7


def test_a_bad_precise_batchnorm_setting_is_named() -> None:
    from torch import nn

    from deltapatch.config import ConfigError
    from deltapatch.models.pretrain import PretrainSettings

    with pytest.raises(ConfigError, match="pretrain.precise_bn_batches='sometimes' must be auto"):
        PretrainSettings(precise_bn_batches="sometimes").precise_batches(nn.BatchNorm2d(2))
