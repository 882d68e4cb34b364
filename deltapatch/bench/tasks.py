"""The tasks a benchmark runs on: built-in names, ingested task names, or a user's own dataset path.

    data = resolve_task(params, "shapes", workdir)            # the embedded suite
    data = resolve_task(params, "street-signs", workdir)      # data/tasks/street-signs (ingested)
    data = resolve_task(params, "~/photos/signs.zip", workdir) # validated like `deltapatch ingest`

A path is validated and normalised exactly as ingestion does it (same rules, same errors), but into
`workdir`: nothing is written into the project's data/ folder, DVC or quarantine.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from deltapatch.bench.settings import BenchSettings
from deltapatch.data import builtin
from deltapatch.data.dataset import TaskData, load_task_dir
from deltapatch.data.ingest import normalise_elsewhere
from deltapatch.data.sources import builtin_task
from deltapatch.data.versioning import tasks_dir
from deltapatch.errors import DatasetError


def resolve_task(params: dict[str, Any], spec: str, workdir: Path) -> TaskData:
    """TaskData for a built-in task name, an ingested task name, or a dataset path (see module doc)."""
    size = int(params["base"]["input_size"])
    if spec in builtin.GENERATORS and spec != builtin.BASE_TASK:
        return builtin_task(params, spec)
    ingested = tasks_dir(params) / spec
    if "/" not in spec and (ingested / "manifest.csv").is_file():
        return load_task_dir(ingested, size, name=spec)
    path = Path(spec).expanduser()
    if path.exists():
        folder = normalise_elsewhere(path, params, Path(workdir) / f"task-{len(list(Path(workdir).glob('task-*')))}")
        return load_task_dir(folder, size, name=folder.name)
    raise DatasetError(
        f"unknown task '{spec}': not a built-in task ({', '.join(builtin.PATCH_TASKS)}), not an ingested "
        f"task in {tasks_dir(params)}, and no such file or folder; pass one of those or a dataset path"
    )


def capped(data: TaskData, bench: BenchSettings, seed: int) -> TaskData:
    """`data` with the per-class caps of `bench` applied (class-balanced, deterministic)."""
    data = copy.copy(data)
    if bench.max_train_per_class:
        data.train = data.train.limit_per_class(int(bench.max_train_per_class), seed)
    if bench.max_eval_per_class:
        data.val = data.val.limit_per_class(int(bench.max_eval_per_class), seed)
        data.test = data.test.limit_per_class(int(bench.max_eval_per_class), seed)
    return data
