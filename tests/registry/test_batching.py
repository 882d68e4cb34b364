"""Dynamic batching: concurrent requests share forwards, each gets exactly its own answers, a failing
request fails alone; per-task forwards give the same logits as one mixed forward (real patch)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from deltapatch.batching import ForwardBatcher
from deltapatch.errors import DeltapatchError
from deltapatch.models.base import load_base
from deltapatch.registry.runtime import Predictor
from tests.registry.conftest import TASK, Trained


@pytest.fixture
def predictor(base_project: dict[str, Any], trained: Trained) -> Predictor:
    predictor = Predictor(load_base(base_project))
    predictor.add_patch(trained.results[0].patch_dir)
    return predictor


def _images(trained: Trained, n: int) -> np.ndarray:
    return trained.data.train.images[:n].permute(0, 2, 3, 1).contiguous().numpy()


def test_per_task_forwards_equal_the_mixed_forward(predictor: Predictor, trained: Trained) -> None:
    images = _images(trained, 12)
    tasks = ["base", TASK, TASK, "base", TASK, "base", "base", TASK, TASK, "base", TASK, "base"]
    mixed = predictor.predict(images, tasks)
    grouped = predictor.predict(images, tasks, group_from=1)
    assert [a["class"] for a in grouped] == [a["class"] for a in mixed]
    for one, other, task in zip(grouped, mixed, tasks, strict=True):
        if task == "base":  # the base rows of a mixed batch are the base model's own
            assert one == other
        else:
            assert one["scores"] == pytest.approx(other["scores"], rel=1e-4, abs=1e-6)
    assert predictor.predict(images, tasks, group_from=13) == mixed  # below the threshold: one mixed forward


def test_concurrent_requests_share_a_forward_and_fail_alone(predictor: Predictor, trained: Trained) -> None:
    images = _images(trained, 10)
    batcher = ForwardBatcher(predictor, max_images=7)
    jobs = [(images[0:2], ["base", TASK]), (images[2:5], [TASK, TASK, "base"]), (images[5:6], ["nosuch"]),
            (images[6:8], ["base", "base"]), (images[8:10], [TASK, "base"])]
    try:
        with predictor.lock:  # the forward thread blocks in the first job's forward; the others queue up
            futures = [batcher.submit(*jobs[0])]
            deadline = time.monotonic() + 30
            while batcher.forwards == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            futures += [batcher.submit(x, t) for x, t in jobs[1:]]
        answers = []
        for future, (x, tasks) in zip(futures, jobs, strict=True):
            if tasks == ["nosuch"]:
                with pytest.raises(DeltapatchError, match="nosuch"):
                    future.result(timeout=60)
                continue
            answers.append(future.result(timeout=60))
            assert answers[-1] == predictor.predict(x, tasks), "each request gets exactly its own rows"
        # job 1 alone; jobs 2-4 together (6 images; job 5 would make 8 > 7), retried alone since job 3
        # fails; then job 5
        assert batcher.forwards == 3
    finally:
        batcher.close()


def test_queue_is_bounded(predictor: Predictor, trained: Trained) -> None:
    from deltapatch.batching import QueueFull

    images = _images(trained, 3)
    batcher = ForwardBatcher(predictor, max_images=1, max_queue=1)
    try:
        with predictor.lock:  # the first job is taken and blocks in its forward; the second waits
            first = batcher.submit(images[0:1], ["base"])
            deadline = time.monotonic() + 30
            while batcher.forwards == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = batcher.submit(images[1:2], [TASK])
            assert batcher.queued == 1 and batcher.full()
            with pytest.raises(QueueFull, match="max_queue=1"):
                batcher.submit(images[2:3], ["base"])
        assert first.result(timeout=60) == predictor.predict(images[0:1], ["base"])
        assert second.result(timeout=60) == predictor.predict(images[1:2], [TASK])
        assert batcher.queued == 0 and not batcher.full()
        assert batcher.submit(images[2:3], ["base"]).result(timeout=60)  # room again
    finally:
        batcher.close()
