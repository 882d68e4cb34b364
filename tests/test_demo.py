"""`deltapatch demo` (what `make demo` runs), shrunk to one tiny task: scratch project, stack up,
submit, the triggered run, the results row, stack down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.flows.conftest import new_project

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env", "prefect_harness")]


def test_demo_patches_a_task_through_the_stack_and_leaves_nothing_running(
        base_project: dict[str, Any], tmp_path: Path) -> None:
    from deltapatch import stack
    from deltapatch.config import load_params
    from deltapatch.demo import run_demo

    source = new_project(base_project, tmp_path / "checkout", {
        "stack": {"prefect_port": free_port(), "mlflow_port": free_port(), "serve_app": False,
                  "watch_stable_seconds": 1.0, "startup_timeout": 300},
        "demo": {"images_per_class": 12, "epochs": 1, "min_steps": 3},
    })
    scratch = tmp_path / "scratch"
    messages: list[str] = []
    try:
        outcome = run_demo(source, scratch, tasks=["shapes"], down_after=True, timeout=600, say=messages.append)
    finally:
        stack.down(load_params(scratch))

    [row] = outcome["results"]
    assert row["task"] == "shapes" and row["status"] == "promoted", row
    base = next(c for c in row["gate"]["checks"] if c["name"] == "base")
    assert base["passed"], base
    assert 0 < row["metrics"]["trainable_pct"] < 5
    assert "base model copied from" in " ".join(messages), "the demo reuses the checkout's base weights"
    assert yaml_train(scratch)["epochs"] == 1, "demo.epochs becomes the scratch project's train.epochs"
    assert yaml_train(scratch)["min_steps"] == 3, "demo.min_steps becomes its train.min_steps"
    assert (scratch / "data" / "tasks" / "shapes").is_dir()
    assert not any((tmp_path / "checkout" / "data" / "tasks").iterdir()), "the demo never touches the checkout's data"
    assert stack.client_env(load_params(scratch)) is None, "--down stopped the scratch stack"


def yaml_train(project: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load((project / "params.yaml").read_text())["train"])
