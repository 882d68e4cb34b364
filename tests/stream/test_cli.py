"""`deltapatch stream` through the CLI: files, clear errors, and one MLflow run in a throw-away sqlite store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from deltapatch.stream.report import COLUMNS


def _in_project(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    root = Path(project["_root"])
    monkeypatch.chdir(root)
    monkeypatch.setitem(os.environ, "DELTAPATCH_PROJECT", str(root))
    return root


def test_unknown_task_or_strategy_is_one_clear_line(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                    isolated_env: None) -> None:
    from deltapatch.cli import app

    _in_project(project, monkeypatch)
    result = CliRunner().invoke(app, ["stream", "--tasks", "street-signs"])
    assert result.exit_code == 2 and "unknown task 'street-signs'" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, ["stream", "--tasks", "shapes", "--strategies", "ewk"])
    assert result.exit_code == 2 and "unknown strategy(ies) ['ewk']" in result.output


@pytest.mark.e2e
def test_quick_stream_logs_one_mlflow_run(project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          isolated_env: None) -> None:
    from mlflow.tracking import MlflowClient

    from deltapatch.cli import app

    root = _in_project(project, monkeypatch)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["stream"]["quick"].update({"epochs": 1, "max_train_per_class": 4, "max_eval_per_class": 3})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "stream"
    result = CliRunner().invoke(app, ["stream", "--quick", "--tasks", "shapes", "--strategies", "delta,naive",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "stream.csv")
    assert list(frame.columns) == COLUMNS and len(frame) == 2 * (1 + 2)
    output = " ".join(result.output.split())
    assert "PASS delta: BWT exactly 0" in output and f"MLflow: {uri} run " in output, output

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("deltapatch-stream")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "delta/base_acc")
    assert [m.step for m in history] == [1, 2] and len({m.value for m in history}) == 1  # base untouched
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "naive/stored_bytes")]
    assert steps == [1, 2]
    assert run.data.metrics["delta/BWT"] == 0.0 and "naive/ACC" in run.data.metrics
    assert run.data.params["tasks"] == "digits,shapes"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"stream.csv", "stream.md", "stream.png"}
