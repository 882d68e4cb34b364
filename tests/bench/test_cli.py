"""A quick bench through the CLI: the output files, seeds, and that every method really trained."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from deltapatch.bench import COLUMNS, BenchSettings
from deltapatch.config import ConfigError, apply_overrides

METHOD_NAMES = ["delta-lowrank", "delta-channel", "full-ft", "linear-probe", "bn-patch", "paint", "peft-lora"]


def test_quick_overrides_merge_method_options() -> None:
    settings = BenchSettings(epochs=6, method_options={"paint": {"lr": 0.001, "alphas": [0, 1]}},
                             quick={"epochs": 1, "method_options": {"paint": {"alphas": [0.5]}}})
    quick = settings.for_run(quick=True)
    assert quick.epochs == 1 and quick.method_options["paint"] == {"lr": 0.001, "alphas": [0.5]}
    assert settings.for_run(quick=False) is settings


def test_set_overrides_parse_yaml_values_and_keep_the_original() -> None:
    params = {"train": {"min_steps": 0}, "bench": {"lr_grid": [0.1]}}
    changed = apply_overrides(params, ["train.min_steps=200", "bench.lr_grid=[0.01, 0.03]"])
    assert changed["train"]["min_steps"] == 200 and changed["bench"]["lr_grid"] == [0.01, 0.03]
    assert params["train"]["min_steps"] == 0
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        apply_overrides(params, ["min_steps"])


@pytest.mark.e2e
def test_quick_bench_two_tasks_two_seeds(project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.cli import app

    root = Path(project["_root"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["bench"]["quick"].update({"epochs": 1, "min_steps": 12, "max_train_per_class": 4, "max_eval_per_class": 4,
                                     "latency_batch": 4, "latency_repeats": 1, "latency_warmup": 0,
                                     "lr_grid": [0.003]})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setitem(os.environ, "DELTAPATCH_PROJECT", str(root))
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--quick", "--tasks", "shapes,digits-parity", "--seeds", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "bench.csv")
    assert list(frame.columns) == COLUMNS
    assert sorted(zip(frame["method"], frame["task"], frame["seed"], strict=True)) == sorted(
        (m, t, s) for m in METHOD_NAMES for t in ("shapes", "digits-parity") for s in (0, 1))
    delta = frame[frame["method"].str.startswith("delta-")]
    assert (delta["base_logits_max_abs_diff"] == 0).all() and (delta["base_acc_change"] == 0).all()
    assert frame.loc[frame["method"] == "full-ft", "train_time_ratio_vs_full_ft"].eq(1.0).all()
    assert frame.loc[frame["method"] == "full-ft", "latency_ratio_merged"].isna().all()  # empty cell
    assert (frame["patch_bytes"] > 0).all() and (frame["epochs_run"] == 12).all()  # 12 steps, one batch (≤ 20 images) per epoch
    report = (out / "bench.md").read_text()
    assert "Targets for the default Δ kind" in report and " ± " in report

    # --resume keeps finished rows and runs only what is missing.
    frame.iloc[:-1].to_csv(out / "bench.csv", index=False)
    result = CliRunner().invoke(app, ["bench", "--quick", "--tasks", "shapes,digits-parity", "--seeds", "2",
                                      "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    again = pd.read_csv(out / "bench.csv")
    assert len(again) == len(frame)
    pd.testing.assert_frame_equal(again.iloc[:-1].reset_index(drop=True)[["method", "task", "seed", "patch_acc"]],
                                  frame.iloc[:-1].reset_index(drop=True)[["method", "task", "seed", "patch_acc"]])


def test_cli_name_lists_accept_commas_and_repeats() -> None:
    from deltapatch.cli.bench import _names

    assert _names(["glyphs,shapes", "digits-parity"]) == ["glyphs", "shapes", "digits-parity"]
    assert _names(None) is None


def test_cli_shots_accept_counts_and_full() -> None:
    from deltapatch.cli.bench import _shot_counts

    assert _shot_counts(["5,10", "full"]) == [5, 10, 0]
    assert _shot_counts(None) is None
    with pytest.raises(typer.BadParameter, match="image counts per class or 'full'"):
        _shot_counts(["five"])


@pytest.mark.e2e
def test_shots_bench_pairs_each_k_with_full_ft(project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.cli import app

    root = Path(project["_root"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["bench"]["quick"].update({"epochs": 1, "min_steps": 4, "max_eval_per_class": 4, "latency_batch": 4,
                                     "latency_repeats": 1, "latency_warmup": 0, "lr_grid": [0.003],
                                     "max_train_per_class": None})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    monkeypatch.setitem(os.environ, "DELTAPATCH_PROJECT", str(root))
    out = tmp_path / "shots"
    result = CliRunner().invoke(app, ["bench", "--quick", "--tasks", "shapes", "--methods", "delta-lowrank,full-ft",
                                      "--shots", "2,full", "--seeds", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "bench.csv")
    assert sorted(set(zip(frame["task"], frame["shots"], strict=True))) == [("shapes-2shot", 2), ("shapes-full", 0)]
    assert len(frame) == 2 * 2 * 2  # methods × K × seeds
    # K = 2: 5 classes × 2 images, one batch per epoch, 4 steps; the whole split: more images per step
    assert (frame.loc[frame["shots"] == 2, "epochs_run"] == 4).all()
    report = (out / "bench.md").read_text()
    assert "## Accuracy against shots" in report and "delta-lowrank − full-ft (paired, 95 % CI)" in report
    assert (out / "bench_shots.png").stat().st_size > 10_000
