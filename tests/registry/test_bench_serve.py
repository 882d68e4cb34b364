"""`deltapatch bench-serve`, small and bounded: the real server process on loopback, real patches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.registry.conftest import TASK, Trained, new_project, register


@pytest.mark.e2e
def test_bench_serve_counts_every_status_and_sees_the_rollback(base_project: dict[str, Any], trained: Trained,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.bench_serve import BAD_KINDS, EXPECTED, run_bench_serve
    from deltapatch.registry import registry as R

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    params = new_project(base_project, tmp_path / "proj", {"registry": {"poll_seconds": 1.0}})
    first, second = trained.results
    register(params, first)
    R.promote(params, TASK, register(params, second), reason="bench test")

    out = tmp_path / "out"
    metrics, statuses = run_bench_serve(params, out, clients=3, seconds=12, batch=4, max_requests=400,
                                        bad_fraction=0.5, ceiling_repeats=3)
    value = dict(zip(metrics["metric"], metrics["value"], strict=True))
    assert value["responses 5xx"] == 0 and value["connection errors"] == 0
    assert value["bad requests without their 4xx"] == 0 and value["good requests not answered 200"] == 0
    assert set(statuses["kind"]) == {"good", *BAD_KINDS}, "every kind of bad request was sent"
    for row in statuses.itertuples():
        assert row.status == EXPECTED[row.kind] == row.expected, row
    visible = next(v for m, v in value.items() if m.startswith(f"rollback {TASK} v2→v1"))
    assert 0 <= visible <= 1.0 + 1 + 2, "the server follows a rollback within a few poll periods"
    assert value["old version answered after the switch"] == 0
    assert value["server peak RSS MB"] > 100
    assert value["served images/s (batch 4, 3 clients)"] > 0
    forwards = {m.split(" served routes")[0].rsplit(", ", 1)[1]: v for m, v in value.items()
                if m.startswith("mixed-task forward / bare forward")}
    assert set(forwards) == {"2", "50"} and all(0 < v < 2 for v in forwards.values()), forwards
    memory = next(v for m, v in value.items() if m.startswith("resident memory per served patch"))
    assert 0 < memory < 10, "50 synthetic copies of the champion cost memory in proportion to its file"
    assert R.get_version(params, TASK)["version"] == 2, "the champion is put back after the benchmark"
    assert pd.read_csv(out / "bench-serve.csv")["metric"].tolist() == metrics["metric"].tolist()
    assert "| served / ceiling |" in (out / "bench-serve.md").read_text()
