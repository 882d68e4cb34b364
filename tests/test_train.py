"""The shared training loop: learning happens, checkpoints resume to the same result."""

from __future__ import annotations

import torch
from torch import nn

from deltapatch.data import builtin
from deltapatch.data.dataset import from_arrays
from deltapatch.train import Normalizer, Trainable, TrainSettings, accuracy, fit, predict_logits


def _tiny_task():
    images, labels, names = builtin.generate("shapes", 16, 0, per_class=16)
    return from_arrays("shapes", images, labels, names, 0.2, 0.2, 0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))


def _trainable(model: nn.Module) -> Trainable:
    return Trainable(model, list(model.parameters()), model.state_dict, model.load_state_dict)


def test_fit_learns_and_reports_history():
    data, norm = _tiny_task(), Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    model = _model()
    before = accuracy(predict_logits(model, data.train, norm), data.train.labels)
    result = fit(_trainable(model), data, TrainSettings(epochs=15, batch_size=16, lr=0.03), norm, progress=False)
    after = accuracy(predict_logits(model, data.train, norm), data.train.labels)
    assert [r.epoch for r in result.history] == list(range(1, 16))
    assert after > before + 0.2
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_interrupted_training_resumes_from_the_checkpoint_to_the_same_weights(tmp_path):
    data, norm = _tiny_task(), Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    settings = TrainSettings(epochs=4, batch_size=16, lr=0.02)
    straight = _model()
    fit(_trainable(straight), data, settings, norm, progress=False, seed=3)

    class Crash(RuntimeError):
        pass

    def crash_after_two(record):
        if record.epoch == 2:
            raise Crash

    checkpoint = tmp_path / "ckpt.pt"
    interrupted = _model()
    try:
        fit(_trainable(interrupted), data, settings, norm, progress=False, seed=3, checkpoint=checkpoint, on_epoch=crash_after_two)
    except Crash:
        pass
    resumed = _model(seed=99)  # a fresh process: different initial weights, restored from the checkpoint
    result = fit(_trainable(resumed), data, settings, norm, progress=False, seed=3, checkpoint=checkpoint)
    assert result.resumed_from_epoch == 2 and [r.epoch for r in result.history] == [3, 4]
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_val_points_spread_the_validation_passes_and_always_score_the_last_epoch() -> None:
    from deltapatch.train import TrainSettings

    settings = TrainSettings(val_points=4)
    chosen = [epoch for epoch in range(1, 201) if settings.validates_after(epoch, 200)]
    assert chosen == [50, 100, 150, 200]
    assert [e for e in range(1, 4) if settings.validates_after(e, 3)] == [1, 2, 3]  # fewer epochs than points
    assert all(TrainSettings().validates_after(e, 7) for e in range(1, 8))  # null: every epoch
