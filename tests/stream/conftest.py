"""A mini stream on the session's quickly pre-trained base: base → a task that conflicts with it → shapes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from deltapatch.data.dataset import Split, TaskData
from deltapatch.stream.settings import StreamSettings

ALL = ["delta", "naive", "ewc", "lwf", "replay", "lora", "paint"]
MINI = StreamSettings(
    strategies=ALL, epochs=1, max_train_per_class=4, max_eval_per_class=3, keep_files=True,
    strategy_options={
        # A large whole-network step on the conflicting task makes naive fine-tuning's forgetting certain.
        "naive": {"lr": 0.01}, "ewc": {"lr": 0.001, "ewc_lambda": 1000.0}, "lwf": {"lr": 0.001},
        "replay": {"lr": 0.001, "mem_per_task": 10}, "paint": {"lr": 0.001, "alphas": [0.0, 1.0]},
    },
)


def swapped_labels(data: TaskData, name: str) -> TaskData:
    """The same images with every label moved to the next class: a task that conflicts with `data`."""
    k = data.num_classes

    def swap(split: Split) -> Split:
        return Split(split.images, (split.labels + 1) % k)

    return TaskData(name, data.class_names, swap(data.train), swap(data.val), swap(data.test))


@pytest.fixture(scope="module")
def mini_stream(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every strategy over digits (base) → digits-swapped → shapes; files kept for inspection."""
    from deltapatch.data.sources import base_eval_data, builtin_task
    from deltapatch.stream.runner import run_tasks

    params = {**base_project, "train": {**base_project["train"], "batch_size": 8}}  # a few steps per task
    tasks = [swapped_labels(base_eval_data(params), "digits-swapped"), builtin_task(params, "shapes")]
    out = tmp_path_factory.mktemp("stream")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)  # no logging: this run is about the numbers
        result = run_tasks(params, tasks, MINI, out_dir=out, progress=False)
    assert Path(result.out_dir) == out and os.path.isdir(out / "store")
    return result
