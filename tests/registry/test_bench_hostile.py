"""`deltapatch bench-serve --hostile`, small and bounded: the real server process on loopback, real
patches, every attack kind sent beside well-behaved clients and answered with its own 4xx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.registry.conftest import TASK, Trained, new_project, register


@pytest.mark.e2e
def test_every_attack_gets_its_4xx_while_good_clients_are_served(base_project: dict[str, Any], trained: Trained,
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.bench_hostile import ATTACK_KINDS, EXPECTED_ATTACK, run_bench_hostile
    from deltapatch.registry import registry as R

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    # A 2 s read timeout, so that the slow senders are cut off (408) within the short phases.
    params = new_project(base_project, tmp_path / "proj", {"serve": {"read_timeout": 2}})
    R.promote(params, TASK, register(params, trained.results[0]), reason="hostile bench test")

    out = tmp_path / "out"
    metrics, attacks = run_bench_hostile(params, out, clients=2, seconds=5, batch=4, max_requests=300,
                                         slow_senders=2, attackers=1)
    value = dict(zip(metrics["metric"], metrics["value"], strict=True))
    assert value["responses 5xx (all phases, all senders)"] == 0
    assert value["attacks without their 4xx"] == 0
    assert value["calm: good requests"] > 0 and value["hostile: good requests (while the floods ran)"] > 0
    assert value["calm: good requests not answered 200"] == 0 and value["hostile: good requests not answered 200"] == 0
    assert set(attacks["kind"]) == set(ATTACK_KINDS), "every kind of attack was sent"
    assert 408 in set(attacks.loc[attacks["kind"] == "slow-sender", "status"]), "the server cut a slow sender off"
    for row in attacks.itertuples():
        assert row.status in (EXPECTED_ATTACK[row.kind], -1) and row.expected == EXPECTED_ATTACK[row.kind], row
    assert pd.read_csv(out / "bench-hostile.csv")["metric"].tolist() == metrics["metric"].tolist()
    assert "| good throughput hostile / calm |" in (out / "bench-hostile.md").read_text()
