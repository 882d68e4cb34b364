"""Where task data comes from: the built-in suite, an ingested task folder, or a user's dataset path.

    data = resolve_task(params, "shapes", workdir)            # the embedded suite
    data = resolve_task(params, "street-signs", workdir)      # data/tasks/street-signs (ingested)
    data = resolve_task(params, "~/photos/signs.zip", workdir) # validated like `deltapatch ingest`

The bench and the continual-learning stream take their tasks through `resolve_task`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Protocol

import torch

from deltapatch.config import resolve_path
from deltapatch.data import builtin
from deltapatch.data.dataset import TaskData, from_arrays, load_task_dir
from deltapatch.data.ingest import normalise_elsewhere
from deltapatch.data.probe import PROBE_PREFIX, probe_task
from deltapatch.data.versioning import tasks_dir
from deltapatch.errors import DatasetError
from deltapatch.models.base import BaseModel

BUILTIN_PREFIX = "builtin:"


def builtin_task(params: dict[str, Any], name: str, per_class: int | None = None) -> TaskData:
    """A built-in task, split like ingestion would split it (same fractions, same seed)."""
    data, demo = params.get("data", {}), params.get("demo", {})
    size = int(params["base"]["input_size"])
    seed = int(params.get("seed", 0))
    images, labels, names = builtin.generate(
        name, size, seed, per_class or int(demo.get("images_per_class", 60))
    )
    return from_arrays(
        name,
        images,
        labels,
        names,
        float(data.get("val_fraction", 0.15)),
        float(data.get("test_fraction", 0.15)),
        seed,
    )


def base_eval_data(params: dict[str, Any], base: BaseModel | None = None) -> TaskData:
    """The base task's data (params.yaml base.eval_set): `builtin:<name>`, an ingested folder, or
    `probe:photos` for a base without labelled base-task data (deltapatch/data/probe.py), labelled
    by `base` when the caller has the project's base loaded already (else it is loaded for that)."""
    source = str(params["base"]["eval_set"])
    if source.startswith(PROBE_PREFIX):
        return probe_task(params, source[len(PROBE_PREFIX):], base)
    if source.startswith(BUILTIN_PREFIX):
        return builtin_task(params, source[len(BUILTIN_PREFIX) :])
    return load_task_dir(resolve_path(params, source), int(params["base"]["input_size"]))


def resolve_task(params: dict[str, Any], spec: str, workdir: Path, per_class: int | None = None) -> TaskData:
    """TaskData for `spec`: an ingested task name (``data/tasks/<name>`` with a manifest; it wins over
    a built-in task of the same name: it is the user's own data), a built-in task name, or the path
    of a dataset folder/archive.

    A path is validated and normalised exactly as ingestion does it (same rules, same errors), but
    into `workdir`: nothing is written into the project's data/ folder, DVC or quarantine.
    `per_class`: images generated per class for a built-in task (default demo.images_per_class).
    """
    size = int(params["base"]["input_size"])
    ingested = tasks_dir(params) / spec
    if "/" not in spec and (ingested / "manifest.csv").is_file():
        return load_task_dir(ingested, size, name=spec)
    if spec in builtin.GENERATORS:  # digits too: on another base (ImageNet) it is a patch task
        return builtin_task(params, spec, per_class)
    path = Path(spec).expanduser()
    if path.exists():
        folder = normalise_elsewhere(path, params, Path(workdir) / f"task-{len(list(Path(workdir).glob('task-*')))}")
        return load_task_dir(folder, size, name=folder.name)
    raise DatasetError(
        f"unknown task '{spec}': not an ingested task in {tasks_dir(params)}, not a built-in task "
        f"({', '.join(builtin.PATCH_TASKS)}), and no such file or folder; pass one of those, or ingest "
        f"your dataset with `deltapatch ingest PATH --task {spec}`"
    )


class PerClassCaps(Protocol):
    """Settings that cap a task's images per class (bench: and stream: sections)."""

    max_train_per_class: int | None
    max_eval_per_class: int | None


def with_shots(data: TaskData, shots: int, seed: int) -> TaskData:
    """`data` with `shots` training images per class, chosen by `seed` (stratified: every class the
    same K); validation and test untouched. 0: the whole training split."""
    data = copy.copy(data)
    if shots:
        have = int(torch.bincount(data.train.labels, minlength=data.num_classes).min())
        if have < shots:
            raise DatasetError(
                f"task '{data.name}': --shots {shots} asks for {shots} training images per class, its smallest class "
                f"has {have}; lower --shots or raise bench.images_per_class (built-in tasks)"
            )
        # Its own stream of the seed: the K images of seed s are the same whatever other caps apply.
        data.train = data.train.limit_per_class(shots, seed + 7919)
    return data


def capped(data: TaskData, caps: PerClassCaps, seed: int) -> TaskData:
    """`data` with the per-class caps applied (class-balanced, deterministic)."""
    data = copy.copy(data)
    if caps.max_train_per_class:
        data.train = data.train.limit_per_class(int(caps.max_train_per_class), seed)
    if caps.max_eval_per_class:
        data.val = data.val.limit_per_class(int(caps.max_eval_per_class), seed)
        data.test = data.test.limit_per_class(int(caps.max_eval_per_class), seed)
    return data
