"""The benchmark's outputs: bench.csv (one row per method, task and seed), bench.md, bench.png.

Semantics of every column and target: docs/benchmark.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
from scipy import stats

from deltapatch.bench.settings import COLUMNS, REFERENCE_METHOD, SHIFT_COLUMNS, BenchSettings

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

Curves = dict[tuple[str, str, int], Sequence[tuple[float, float]]]


def time_to_accuracy(curve: Sequence[tuple[float, float]], target: float) -> float:
    """Training seconds until the validation accuracy first reaches `target`; inf if it never does.

    `curve`: per epoch, (validation accuracy, cumulative training seconds).
    """
    for val_acc, seconds in curve:
        if val_acc >= target:
            return seconds
    return math.inf


def write_csv(rows: list[dict[str, Any]], curves: Curves, out_dir: Path) -> pd.DataFrame:
    """Add the columns that compare with full-ft, write bench.csv with exactly COLUMNS (NaN → empty)."""
    frame = pd.DataFrame(rows, columns=COLUMNS)
    reference = frame[frame["method"] == REFERENCE_METHOD].set_index(["task", "seed"])
    ratios, times = [], []
    for row in frame.itertuples():
        key = (row.task, row.seed)
        if key not in reference.index:
            ratios.append(math.nan)
            times.append(math.nan)
            continue
        ref = reference.loc[key]
        ratios.append(row.train_s_per_epoch / ref["train_s_per_epoch"])
        curve = curves.get((row.method, row.task, int(row.seed)))
        # The honest cost: time to reach full-ft's final validation accuracy ÷ full-ft's training time.
        times.append(time_to_accuracy(curve, ref["val_acc"]) / ref["train_seconds"] if curve else math.nan)
    frame["train_time_ratio_vs_full_ft"] = ratios
    frame["time_to_full_ft_val_ratio"] = times
    frame.to_csv(out_dir / "bench.csv", index=False)
    return frame


# ---------------------------------------------------------------- targets of the default Δ kind
TARGETS: list[str] = [
    "base_logits_max_abs_diff == 0 on every task",
    "base_acc_change == 0 on every task",
    "mean patch_acc ≥ full-ft mean − 0.01",
    "mean patch_acc ≥ paint, bn-patch, linear-probe means",
    "patch_acc ≥ full-ft − 0.03 on every task",
    "trainable_pct ≤ 3",
    "patch_pct ≤ 3",
    "train_time_ratio_vs_full_ft ≤ 0.85",
    "step_time_ratio_paired ≤ 0.85",
    "time_to_full_ft_val_ratio ≤ 0.85 on every task",
    "latency_ratio_merged ≤ 1.05",
]


def target_checks(frame: pd.DataFrame, method: str) -> list[tuple[str, str, float]]:
    """[(target, PASS/MISS/n/a, measured)] for `method` over the tasks (and seeds) in `frame`.

    Accuracies are first averaged over seeds per task, then over tasks.
    """
    rows = frame[frame["method"] == method]
    if rows.empty:
        return []
    per_task = frame.groupby(["method", "task"])["patch_acc"].mean()
    means = per_task.groupby("method").mean()
    mine = float(means[method])
    others = [means[m] for m in ("paint", "bn-patch", "linear-probe") if m in means]
    worst_task_gap = math.nan
    if REFERENCE_METHOD in means:
        gaps = [per_task[(method, t)] - per_task[(REFERENCE_METHOD, t)] for t in per_task[method].index
                if (REFERENCE_METHOD, t) in per_task.index]
        worst_task_gap = min(gaps) + 0.03 if gaps else math.nan
    time_to_acc = rows.groupby("task")["time_to_full_ft_val_ratio"].mean()
    measured = [
        (float(rows["base_logits_max_abs_diff"].max()), lambda v: v == 0),
        (float(rows["base_acc_change"].abs().max()), lambda v: v == 0),
        (mine - (means[REFERENCE_METHOD] - 0.01) if REFERENCE_METHOD in means else math.nan, lambda v: v >= 0),
        (mine - max(others) if others else math.nan, lambda v: v >= 0),
        (worst_task_gap, lambda v: v >= 0),
        (float(rows["trainable_pct"].max()), lambda v: v <= 3),
        (float(rows["patch_pct"].max()), lambda v: v <= 3),
        (float(rows["train_time_ratio_vs_full_ft"].mean()), lambda v: v <= 0.85),
        (float(rows["step_time_ratio_paired"].mean()), lambda v: v <= 0.85),
        (float(time_to_acc.max()) if time_to_acc.notna().any() else math.nan, lambda v: v <= 0.85),
        (float(rows["latency_ratio_merged"].mean()), lambda v: v <= 1.05),
    ]
    return [
        (target, "n/a" if math.isnan(value) else ("PASS" if ok(value) else "MISS"), value)
        for target, (value, ok) in zip(TARGETS, measured, strict=True)
    ]


# ---------------------------------------------------------------- bench.md
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "not reached"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def _mean_std(values: pd.Series) -> str:
    if len(values) < 2:
        return f"{values.mean():.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def accuracy_table(frame: pd.DataFrame) -> pd.DataFrame:
    """patch_acc as 'mean ± std over seeds' per method (rows) and task (columns), plus the mean over
    tasks (its ± is the std over seeds of the per-seed task mean)."""
    methods = list(dict.fromkeys(frame["method"]))
    tasks = list(dict.fromkeys(frame["task"]))
    table = []
    for method in methods:
        mine = frame[frame["method"] == method]
        cells = {"method": method}
        for task in tasks:
            values = mine.loc[mine["task"] == task, "patch_acc"]
            cells[task] = _mean_std(values) if len(values) else ""
        per_seed = mine.groupby("seed")["patch_acc"].mean()
        cells["mean over tasks"] = _mean_std(per_seed)
        table.append(cells)
    return pd.DataFrame(table)


# ---------------------------------------------------------------- zero-shot domain shift
def shift_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method: clean test accuracy and each shifted copy's (mean over tasks and seeds), and the
    mean drop from clean to shifted: how far each method's patch generalises beyond its domain."""
    columns = [c for c in SHIFT_COLUMNS.values() if c in frame and frame[c].notna().any()]
    means = frame.groupby("method", sort=False)[["patch_acc", *columns]].mean()
    means["mean drop"] = means["patch_acc"] - means[columns].mean(axis=1)
    return means.rename(columns={c: c.removeprefix("shift_").removesuffix("_acc") for c in columns}).reset_index()


# ---------------------------------------------------------------- few-shot (bench --shots)
SHOTS_COMPARED = (REFERENCE_METHOD, "paint", "peft-lora")  # the default Δ − each of these, paired


def _shots_name(k: float) -> str:
    return "full" if int(k) == 0 else f"K={int(k)}"


def _shot_order(frame: pd.DataFrame) -> list[float]:
    """K ascending, the whole training split (0) last."""
    return sorted(frame["shots"].dropna().unique(), key=lambda k: (k == 0, k))


def paired_interval(diffs: pd.Series) -> str:
    """'mean [low, high]': the 95 % t-interval of paired differences (n − 1 degrees of freedom)."""
    n = len(diffs)
    if n < 2:
        return f"{diffs.mean():+.3f} (n={n})" if n else ""
    half = float(stats.t.ppf(0.975, n - 1)) * float(diffs.std(ddof=1)) / math.sqrt(n)
    return f"{diffs.mean():+.3f} [{diffs.mean() - half:+.3f}, {diffs.mean() + half:+.3f}] (n={n})"


def shots_table(frame: pd.DataFrame, default_method: str) -> pd.DataFrame:
    """Rows: each method's test accuracy per K (mean ± std over seeds of the mean over tasks), then the
    default Δ minus full-ft, PAINT and PEFT LoRA, paired per (task, seed), with a 95 % interval."""
    rows = frame[frame["shots"].notna()]
    order = _shot_order(rows)
    table: list[dict[str, str]] = []
    for method in dict.fromkeys(rows["method"]):
        mine = rows[rows["method"] == method]
        cells = {"method": method}
        for k in order:
            per_seed = mine[mine["shots"] == k].groupby("seed")["patch_acc"].mean()
            cells[_shots_name(k)] = _mean_std(per_seed) if len(per_seed) else ""
        table.append(cells)
    indexed = rows.set_index(["method", "task", "seed"])["patch_acc"]
    for other in SHOTS_COMPARED:
        if other == default_method or other not in set(rows["method"]) or default_method not in set(rows["method"]):
            continue
        cells = {"method": f"{default_method} − {other} (paired, 95 % CI)"}
        diffs = (indexed.loc[default_method] - indexed.loc[other]).dropna()  # per (task, seed)
        for k in order:
            tasks = rows.loc[rows["shots"] == k, "task"].unique()
            cells[_shots_name(k)] = paired_interval(diffs[diffs.index.get_level_values("task").isin(tasks)])
        table.append(cells)
    return pd.DataFrame(table)


def write_shots_plot(frame: pd.DataFrame, path: Path) -> None:
    """bench_shots.png: test accuracy against training images per class, one line per method
    (mean over tasks, ± std over seeds); the whole training split drawn right of the largest K."""
    rows = frame[frame["shots"].notna()].copy()
    order = _shot_order(rows)
    full_x = 2 * max([k for k in order if k] or [1])  # where "full" sits when its size is not recorded
    rows["x"] = rows["shots"].where(rows["shots"] != 0, full_x)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, method in enumerate(dict.fromkeys(rows["method"])):
        mine = rows[rows["method"] == method]
        per_seed = mine.groupby(["x", "seed"])["patch_acc"].mean().groupby("x")
        mean, std = per_seed.mean(), per_seed.std(ddof=1).fillna(0.0)
        ax.errorbar(mean.index, mean.values, yerr=std.values, marker="osD^v<>ph"[i % 9], capsize=3, label=method)
    ax.set_xscale("log")
    ticks = [full_x if k == 0 else k for k in order]
    ax.set_xticks(ticks, [_shots_name(k).removeprefix("K=") for k in order])
    ax.set(xlabel="training images per class", ylabel="test accuracy (mean over tasks)",
           title="accuracy against shots (± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(frame: pd.DataFrame, notes: list[str], path: Path, *, default_method: str,
                   bench: BenchSettings, quick: bool, base_untouched: bool, overrides: list[str] | None = None) -> None:
    """bench.md: settings, accuracy mean ± std, per-method means, the target check, all rows, notes."""
    numeric = frame.drop(columns=["task", "seed"]).groupby("method", sort=False).mean(numeric_only=True)
    means = numeric.drop(columns=["lr"]).reset_index()
    seeds = sorted(int(s) for s in frame["seed"].unique())
    lrs = frame.groupby(["method", "task"], sort=False)["lr"].first().unstack()
    parts = [
        "# deltapatch benchmark" + (" (quick)" if quick else ""),
        f"epochs {bench.epochs} (step budget: train.min_steps or bench.min_steps = {bench.min_steps}), "
        f"max_train_per_class {bench.max_train_per_class or 'all'}, seeds {seeds}, lr grid {bench.lr_grid} "
        f"(chosen per method and task on the validation split, first seed), latency batch "
        f"{bench.latency_batch} × {bench.latency_repeats} repeats; tasks: {', '.join(dict.fromkeys(frame['task']))}"
        + (f"; overrides: {' '.join(f'--set {o}' for o in overrides)}" if overrides else ""),
        "## Patch accuracy (test), mean ± std over seeds", _table(accuracy_table(frame)),
        *(["## Zero-shot domain shift (test sets blurred, low-contrast, inverted; never trained on)",
           _table(shift_table(frame))] if any(frame[c].notna().any() for c in SHIFT_COLUMNS.values()) else []),
        *(["## Accuracy against shots (training images per class; bench_shots.png)",
           _table(shots_table(frame, default_method))] if frame["shots"].notna().any() else []),
        "## Mean over tasks and seeds", _table(means),
        f"## Targets for the default Δ kind ({default_method})",
        "| target | result | measured |\n|---|---|---|",
    ]
    checks = target_checks(frame, default_method)
    parts[-1] += "".join(f"\n| {t} | {r} | {_fmt(v)} |" for t, r, v in checks) if checks else "\n| (not run) | n/a | |"
    parts += ["## Learning rate chosen on validation", _table(lrs.reset_index())]
    all_notes = [f"- pristine base model unchanged after every method: {'yes' if base_untouched else 'NO'}"]
    all_notes += [f"- {note}" for note in notes]
    parts += ["## All runs", _table(frame), "## Notes", "\n".join(all_notes)]
    path.write_text("\n\n".join(parts) + "\n")


# ---------------------------------------------------------------- bench.png
def write_plot(frame: pd.DataFrame, path: Path) -> None:
    """bench.png: (left) mean patch_acc vs mean base_acc_change per method; (right) patch_acc per
    task with the std over seeds as error bars."""
    means = frame.groupby("method", sort=False)[["patch_acc", "base_acc_change"]].mean()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (method, row) in enumerate(means.iterrows()):
        left.scatter(row.base_acc_change, row.patch_acc, s=70, marker="osD^v<>ph"[i % 9], label=method)
        # Staggered offsets: methods that land on the same point stay readable.
        left.annotate(method, (row.base_acc_change, row.patch_acc), textcoords="offset points",
                      xytext=(6, -14 + 10 * (i % 4)), fontsize=8)
    left.axvline(0, color="grey", lw=0.8, ls="--")
    left.legend(fontsize=7, loc="best")
    left.set(xlabel="base accuracy change (mean over tasks)", ylabel="patch accuracy (mean over tasks)",
             title="patch accuracy vs. base-task change")
    grouped = frame.groupby(["task", "method"], sort=False)["patch_acc"]
    order = list(means.index)
    mean = grouped.mean().unstack()[order]
    std = grouped.std(ddof=1).unstack()[order].fillna(0.0)
    mean.plot.bar(ax=right, rot=20, width=0.85, yerr=std, capsize=2)
    right.set(ylabel="patch accuracy", title="patch accuracy per task (± std over seeds)", ylim=(0, 1.05))
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
