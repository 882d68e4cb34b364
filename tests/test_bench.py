"""A quick bench on two tasks through the CLI: the output files and their invariants."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from deltapatch.bench import COLUMNS, BenchSettings

METHOD_NAMES = ["delta-lowrank", "delta-channel", "full-ft", "linear-probe", "bn-patch", "paint", "peft-lora"]


def test_quick_overrides_merge_method_options() -> None:
    settings = BenchSettings(epochs=6, method_options={"paint": {"lr": 0.001, "alphas": [0, 1]}},
                             quick={"epochs": 1, "method_options": {"paint": {"alphas": [0.5]}}})
    quick = settings.for_run(quick=True)
    assert quick.epochs == 1 and quick.method_options["paint"] == {"lr": 0.001, "alphas": [0.5]}
    assert settings.for_run(quick=False) is settings


@pytest.mark.e2e
def test_quick_bench_two_tasks(project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.cli import app

    root = Path(project["_root"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["bench"]["quick"].update({"epochs": 1, "max_train_per_class": 4, "max_eval_per_class": 4,
                                     "latency_batch": 4, "latency_repeats": 1, "latency_warmup": 0})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setitem(os.environ, "DELTAPATCH_PROJECT", str(root))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--quick", "--tasks", "shapes,digits-parity", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "bench.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(zip(frame["method"], frame["task"], strict=True)) == sorted(
        (m, t) for m in METHOD_NAMES for t in ("shapes", "digits-parity"))
    for column in ("patch_acc", "base_acc"):
        assert frame[column].between(0, 1).all()
    delta = frame[frame["method"].str.startswith("delta-")]
    assert (delta["base_logits_max_abs_diff"] == 0).all() and (delta["base_acc_change"] == 0).all()
    assert frame.loc[frame["method"] == "full-ft", "train_time_ratio_vs_full_ft"].eq(1.0).all()
    assert frame.loc[frame["method"] == "full-ft", "latency_ratio_merged"].isna().all()  # empty cell
    assert (frame["patch_bytes"] > 0).all()
    assert "Targets for the default Δ kind" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 0


def test_cli_name_lists_accept_commas_and_repeats() -> None:
    from deltapatch.cli.bench import _names

    assert _names(["glyphs,shapes", "digits-parity"]) == ["glyphs", "shapes", "digits-parity"]
    assert _names(None) is None


def test_target_checks_say_pass_and_miss_with_numbers() -> None:
    from deltapatch.bench import target_checks

    rows = []
    for method, acc, diff in (("delta-channel", 0.9, 0.0), ("full-ft", 0.95, 3.0), ("paint", 0.8, 1.0)):
        rows.append({"method": method, "task": "t", "patch_acc": acc, "base_acc": 0.9, "base_acc_change": -diff / 10,
                     "base_logits_max_abs_diff": diff, "trainable_params": 1, "trainable_pct": 0.2,
                     "patch_bytes": 1, "patch_pct": 0.3, "train_s_per_epoch": 1.0,
                     "train_time_ratio_vs_full_ft": 0.5, "latency_ratio_merged": float("nan"),
                     "latency_ratio_unmerged": 1.0})
    checks = {t: (r, v) for t, r, v in target_checks(pd.DataFrame(rows), "delta-channel")}
    assert checks["base_logits_max_abs_diff == 0 on every task"] == ("PASS", 0.0)
    result, value = checks["mean patch_acc ≥ full-ft mean − 0.01"]
    assert result == "MISS" and value == pytest.approx(-0.04)
    assert checks["latency_ratio_merged ≤ 1.05"][0] == "n/a"
