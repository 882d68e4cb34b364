"""bench.csv columns, the comparisons with full-ft, and the target check."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from deltapatch.bench import COLUMNS, accuracy_table, target_checks, time_to_accuracy
from deltapatch.bench.report import paired_interval, shift_table, shots_table, write_csv, write_shots_plot


def _row(method: str, task: str, seed: int, acc: float, **extra: float) -> dict:
    row = {"method": method, "task": task, "patch_acc": acc, "base_acc": 0.9, "base_acc_change": 0.0,
           "base_logits_max_abs_diff": 0.0, "trainable_params": 1, "trainable_pct": 0.2, "patch_bytes": 1,
           "patch_pct": 0.3, "train_s_per_epoch": 1.0, "train_time_ratio_vs_full_ft": math.nan,
           "latency_ratio_merged": math.nan, "latency_ratio_unmerged": 1.0, "seed": seed, "lr": 0.01,
           "val_acc": acc, "epochs_run": 3, "train_seconds": 3.0, "time_to_full_ft_val_ratio": math.nan,
           "step_time_ratio_paired": 0.7}
    row.update(extra)
    return row


def test_time_to_accuracy_is_the_first_epoch_that_reaches_the_target() -> None:
    curve = [(0.5, 1.0), (0.8, 2.0), (0.9, 3.0)]
    assert time_to_accuracy(curve, 0.8) == 2.0
    assert time_to_accuracy(curve, 0.95) == math.inf


def test_csv_keeps_the_original_columns_first_and_compares_with_full_ft(tmp_path: Path) -> None:
    rows = [_row("full-ft", "t", 0, 0.9, train_s_per_epoch=2.0, train_seconds=6.0, val_acc=0.8),
            _row("delta-lowrank", "t", 0, 0.95, train_s_per_epoch=1.0)]
    curves = {("delta-lowrank", "t", 0): [(0.7, 1.0), (0.85, 3.0)], ("full-ft", "t", 0): [(0.8, 6.0)]}
    frame = write_csv(rows, curves, tmp_path)
    assert list(pd.read_csv(tmp_path / "bench.csv").columns) == COLUMNS
    assert COLUMNS[:14] == ["method", "task", "patch_acc", "base_acc", "base_acc_change", "base_logits_max_abs_diff",
                            "trainable_params", "trainable_pct", "patch_bytes", "patch_pct", "train_s_per_epoch",
                            "train_time_ratio_vs_full_ft", "latency_ratio_merged", "latency_ratio_unmerged"]
    assert COLUMNS[14] == "seed"  # appended after the original columns
    delta = frame[frame["method"] == "delta-lowrank"].iloc[0]
    assert delta["train_time_ratio_vs_full_ft"] == pytest.approx(0.5)
    # Δ reaches full-ft's final val accuracy (0.8) after 3 s of training; full-ft trained 6 s.
    assert delta["time_to_full_ft_val_ratio"] == pytest.approx(0.5)


def test_target_checks_say_pass_and_miss_with_numbers() -> None:
    rows = []
    for method, acc, diff in (("delta-channel", 0.9, 0.0), ("full-ft", 0.95, 3.0), ("paint", 0.8, 1.0)):
        rows.append(_row(method, "t", 0, acc, base_logits_max_abs_diff=diff, base_acc_change=-diff / 10,
                         train_time_ratio_vs_full_ft=0.5))
    checks = {t: (r, v) for t, r, v in target_checks(pd.DataFrame(rows), "delta-channel")}
    assert checks["base_logits_max_abs_diff == 0 on every task"] == ("PASS", 0.0)
    result, value = checks["mean patch_acc ≥ full-ft mean − 0.01"]
    assert result == "MISS" and value == pytest.approx(-0.04)
    result, value = checks["patch_acc ≥ full-ft − 0.03 on every task"]
    assert result == "MISS" and value == pytest.approx(-0.02)
    assert checks["latency_ratio_merged ≤ 1.05"][0] == "n/a"


def test_accuracy_table_reports_mean_and_std_over_seeds() -> None:
    frame = pd.DataFrame([_row("m", "a", 0, 0.8), _row("m", "a", 1, 0.9), _row("m", "b", 0, 0.6), _row("m", "b", 1, 0.7)])
    table = accuracy_table(frame).set_index("method")
    assert table.loc["m", "a"] == "0.850 ± 0.071"
    assert table.loc["m", "mean over tasks"] == "0.750 ± 0.071"  # seed 0: 0.7, seed 1: 0.8


def test_shots_table_pairs_the_default_with_full_ft_per_task_and_seed(tmp_path: Path) -> None:
    rows = []
    for k, gap in ((5, 0.10), (0, -0.02)):
        for task in ("a", "b"):
            name = f"{task}-{k}shot" if k else f"{task}-full"
            for seed in range(3):
                ref = 0.5 + 0.1 * seed + (0.3 if k == 0 else 0.0)
                rows.append(_row("full-ft", name, seed, ref, shots=k))
                rows.append(_row("delta-lowrank", name, seed, ref + gap, shots=k))
    frame = write_csv(rows, {}, tmp_path)
    table = shots_table(frame, "delta-lowrank").set_index("method")
    assert list(table.columns) == ["K=5", "full"]  # K ascending, the whole split last
    diff = table.loc["delta-lowrank − full-ft (paired, 95 % CI)"]
    # the per-seed offsets cancel in the pairing: a constant gap has a zero-width interval
    assert diff["K=5"].startswith("+0.100 [+0.100, +0.100] (n=6)")
    assert diff["full"].startswith("-0.020 [-0.020, -0.020] (n=6)")
    assert table.loc["full-ft", "K=5"] == "0.600 ± 0.100"
    write_shots_plot(frame, tmp_path / "shots.png")
    assert (tmp_path / "shots.png").stat().st_size > 10_000


def test_paired_interval_widens_with_noise() -> None:
    narrow = paired_interval(pd.Series([0.01, 0.02, 0.015, 0.012]))
    wide = paired_interval(pd.Series([0.2, -0.15, 0.1, -0.05]))
    low, high = (float(v) for v in narrow.split("[")[1].split("]")[0].split(","))
    assert 0 < low < high
    low, high = (float(v) for v in wide.split("[")[1].split("]")[0].split(","))
    assert low < 0 < high


def test_shift_table_reports_the_drop_from_clean_to_shifted() -> None:
    rows = [_row("delta-lowrank", "a", 0, 0.9, shift_blur_acc=0.8, shift_contrast_acc=0.7, shift_invert_acc=0.3),
            _row("full-ft", "a", 0, 0.9, shift_blur_acc=0.85, shift_contrast_acc=0.8, shift_invert_acc=0.5)]
    table = shift_table(pd.DataFrame(rows, columns=COLUMNS)).set_index("method")
    assert list(table.columns) == ["patch_acc", "blur", "contrast", "invert", "mean drop"]
    assert table.loc["delta-lowrank", "mean drop"] == pytest.approx(0.9 - 0.6)
    assert table.loc["full-ft", "mean drop"] == pytest.approx(0.9 - 0.7166666, abs=1e-6)
