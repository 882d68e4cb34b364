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
