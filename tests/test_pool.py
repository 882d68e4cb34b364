"""deltapatch.pool.training_note: what an arrival's report says about how its patch was trained."""

from __future__ import annotations

from deltapatch.pool import TrainingAttempt, training_note
from deltapatch.step_results import TrainedPatch


def _trained(**changes: object) -> TrainedPatch:
    fields: dict[str, object] = dict(
        task="shapes", patch_dir="/p", metrics={"patch_acc": 1.0}, base_check={}, resumed_from_epoch=0,
        checkpoint="/shared/ckpt/shapes-ab.pt", training_key="train-abc", epochs_run=8, history=[], device="cpu",
        data_version="v", wall_seconds=1.0, files={})
    fields.update(changes)
    return TrainedPatch(**fields)  # type: ignore[arg-type]


def test_one_run_reused_resumed_and_restarted_are_told_apart() -> None:
    crashed = TrainingAttempt(1, "r1", "train-shapes", "Crashed", 60.0, "no heartbeat for 45 s")
    second = TrainingAttempt(2, "r2", "train-shapes-attempt-2", "Completed", 90.0)
    assert training_note(_trained(), [], reused=False) == "Training: 8 epochs in one run."
    assert "reused the finished training `train-abc`" in training_note(_trained(), [], reused=True)

    resumed = training_note(_trained(attempt=2, resumed_from_epoch=3), [crashed, second], reused=False)
    assert resumed.startswith("Training: attempt 2 resumed after epoch 3 from the checkpoint `/shared/ckpt/shapes-ab.pt`")
    assert "| 1 | `train-shapes` | Crashed |" in resumed and "| 2 | `train-shapes-attempt-2` | Completed |" in resumed

    # the new worker could not read the checkpoint: it started again, and the report says so and why
    restarted = training_note(_trained(attempt=2), [crashed, second], reused=False)
    assert "attempt 2 **restarted from epoch 1**" in restarted
    assert "reachable at `/shared/ckpt/shapes-ab.pt`" in restarted and "faults.checkpoint_dir" in restarted
