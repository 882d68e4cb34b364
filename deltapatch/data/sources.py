"""Where task data comes from: the built-in suite or an ingested task folder."""

from __future__ import annotations

from typing import Any

from deltapatch.config import resolve_path
from deltapatch.data import builtin
from deltapatch.data.dataset import TaskData, from_arrays, load_task_dir

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


def base_eval_data(params: dict[str, Any]) -> TaskData:
    """The base task's data (params.yaml base.eval_set): `builtin:<name>` or an ingested folder."""
    source = str(params["base"]["eval_set"])
    if source.startswith(BUILTIN_PREFIX):
        return builtin_task(params, source[len(BUILTIN_PREFIX) :])
    return load_task_dir(resolve_path(params, source), int(params["base"]["input_size"]))
