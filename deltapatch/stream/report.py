"""stream.csv, stream.md and stream.png from a StreamResult (column semantics: docs/benchmark.md)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from deltapatch.stream.results import StrategyRun, StreamResult

COLUMNS = ["strategy", "after_task", "eval_task", "accuracy", "seconds", "stored_bytes"]
DELTA = "delta"  # the strategy the targets are about
FORGETS = "naive"  # the strategy whose forgetting the table must show
STORAGE_FACTOR = 1.15  # Δ-patching's stored bytes after the stream ≤ this × the base model file
ACC_MARGIN = 0.01  # Δ-patching's ACC ≥ every other strategy's ACC − this


def write_all(result: StreamResult) -> None:
    write_csv(result, result.out_dir / "stream.csv")
    write_markdown(result, result.out_dir / "stream.md")
    write_plot(result, result.out_dir / "stream.png")


def rows(result: StreamResult) -> list[dict[str, object]]:
    """One row per (strategy, arrival, task seen so far)."""
    return [
        {"strategy": run.strategy, "after_task": arrival.task, "eval_task": run.tasks[j], "accuracy": acc,
         "seconds": arrival.seconds, "stored_bytes": arrival.stored_bytes}
        for run in result.runs for arrival in run.arrivals for j, acc in enumerate(arrival.accuracies)
    ]


def write_csv(result: StreamResult, path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(result))


# ---------------------------------------------------------------- targets
def target_checks(result: StreamResult) -> list[tuple[str, str, float]]:
    """[(target, PASS/MISS/n/a, measured)] — the issue's targets, from this run's numbers."""
    delta, naive = result.run(DELTA), result.run(FORGETS)
    n = len(result.tasks) - 1
    others = [r.acc for r in result.runs if r.strategy != DELTA]
    checks: list[tuple[str, float, bool | None]] = []
    if delta is not None:
        diffs = [a.base_logits_max_abs_diff for a in delta.arrivals]
        identical = all(a.base_bit_identical for a in delta.arrivals)
        base_accs = [a.accuracies[0] for a in delta.arrivals]
        margin = delta.acc - (max(others) - ACC_MARGIN) if others else math.nan
        ratio = delta.arrivals[-1].stored_bytes / result.base_bytes
        checks += [
            ("delta: BWT exactly 0", delta.bwt, delta.bwt == 0),
            ("delta: base-task logits bit-identical after every arrival (max abs Δlogit)", max(diffs), identical),
            ("delta: base-task accuracy unchanged after every arrival (max abs Δacc)",
             max(abs(a - base_accs[0]) for a in base_accs), all(a == base_accs[0] for a in base_accs)),
            (f"delta: ACC ≥ every other strategy's ACC − {ACC_MARGIN} (ACC − (best other − {ACC_MARGIN}))",
             margin, None if math.isnan(margin) else margin >= 0),
            (f"delta: stored bytes after {n} tasks ≤ {STORAGE_FACTOR}× the base model file (ratio)",
             ratio, ratio <= STORAGE_FACTOR),
        ]
    if naive is not None:
        checks.append(("naive: forgetting shows, BWT < 0", naive.bwt, None if math.isnan(naive.bwt) else naive.bwt < 0))
    return [(t, "n/a" if ok is None else ("PASS" if ok else "MISS"), v) for t, v, ok in checks]


# ---------------------------------------------------------------- markdown
def _fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _table(header: list[str], lines: list[list[object]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]
    return "\n".join(out)


def summary_lines(result: StreamResult) -> list[list[object]]:
    lines = []
    for run in result.runs:
        last = run.arrivals[-1]
        lines.append([
            run.strategy, run.acc, run.bwt, run.fwt, last.accuracies[0],
            "yes" if all(a.base_bit_identical for a in run.arrivals) else
            f"no (max {max(a.base_logits_max_abs_diff for a in run.arrivals):.3g})",
            f"{last.stored_bytes / 1e6:.2f}", f"{last.stored_bytes / result.base_bytes:.3f}", f"{run.train_seconds:.1f}",
        ])
    return lines


def matrix_table(run: StrategyRun) -> str:
    header = ["after ↓ / on →", *run.tasks]
    lines = [[a.task, *a.accuracies, *[""] * (len(run.tasks) - len(a.accuracies))] for a in run.arrivals]
    return _table(header, lines)


def write_markdown(result: StreamResult, path: Path) -> None:
    settings = result.settings
    n = len(result.tasks) - 1
    parts = [
        "# deltapatch continual-learning stream" + (" (quick)" if result.quick else ""),
        f"Stream (task-incremental: the task identity is known at inference): {' → '.join(result.tasks)} "
        f"(the first is the base task, learned by pre-training). epochs {settings.epochs}, "
        f"max_train_per_class {settings.max_train_per_class or 'all'}, max_eval_per_class "
        f"{settings.max_eval_per_class or 'all'}; base model file {result.base_bytes / 1e6:.2f} MB; "
        f"wall time {result.wall_seconds:.0f} s.",
        f"## Per strategy (after all {n + 1} tasks)",
        _table(["strategy", "ACC", "BWT", "FWT", "final base acc", "base logits bit-identical after every arrival",
                f"stored MB after {n} tasks", "stored ÷ base model", "train s"], summary_lines(result)),
        "ACC: mean final accuracy over all tasks; BWT: mean of (final − just-learned) accuracy over all tasks "
        "but the last (< 0 = forgetting); FWT: mean of (accuracy just before training on a task − the same "
        "untrained head on the pristine base), Avalanche's definitions (docs/benchmark.md).",
        "## Targets",
        "| target | result | measured |\n|---|---|---|" + "".join(
            f"\n| {t} | {r} | {_fmt(v, 6)} |" for t, r, v in target_checks(result)),
        "## Accuracy matrices R[i][j] (test accuracy on task j after learning task i)",
    ]
    for run in result.runs:
        parts += [f"### {run.strategy}", matrix_table(run)]
    notes = [f"- pristine base model unchanged after every strategy: {'yes' if result.pristine_base_unchanged else 'NO'}"]
    notes += [f"- {run.strategy}: {note}" for run in result.runs for note in run.notes]
    parts += ["## Notes", "\n".join(notes)]
    path.write_text("\n\n".join(parts) + "\n")


# ---------------------------------------------------------------- plot
def write_plot(result: StreamResult, path: Path) -> None:
    """An accuracy-matrix heatmap per strategy, then base-task accuracy and stored bytes against
    the number of tasks seen."""
    import matplotlib  # lazy: the Agg backend must be chosen before pyplot loads; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use above

    runs = result.runs
    panels = len(runs) + 2
    cols = min(3, panels)
    rows_ = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 4.4 * rows_), squeeze=False)
    flat = list(axes.flat)
    labels = result.tasks
    for ax, run in zip(flat, runs, strict=False):
        size = len(run.tasks)
        matrix = np.full((size, size), np.nan)
        for i, arrival in enumerate(run.arrivals):
            matrix[i, : len(arrival.accuracies)] = arrival.accuracies
        ax.imshow(np.ma.masked_invalid(matrix), vmin=0, vmax=1, cmap="viridis")
        for i in range(size):
            for j in range(i + 1):
                if not np.isnan(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if matrix[i, j] < 0.6 else "black")
        ax.set_xticks(range(size), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(size), labels, fontsize=7)
        ax.set_title(f"{run.strategy}: ACC {run.acc:.3f}, BWT {run.bwt:+.3f}", fontsize=9)
        ax.set_xlabel("evaluated on", fontsize=8)
        ax.set_ylabel("after learning", fontsize=8)
    base_ax, bytes_ax = flat[len(runs)], flat[len(runs) + 1]
    for i, run in enumerate(runs):
        seen = range(1, len(run.arrivals) + 1)
        marker = "osD^v<>ph"[i % 9]
        base_ax.plot(seen, [a.accuracies[0] for a in run.arrivals], marker=marker, label=run.strategy)
        bytes_ax.plot(seen, [a.stored_bytes / 1e6 for a in run.arrivals], marker=marker, label=run.strategy)
    base_ax.set(xlabel="tasks seen", ylabel=f"accuracy on the base task ({labels[0]})", title="base-task accuracy",
                ylim=(0, 1.05))
    bytes_ax.axhline(result.base_bytes / 1e6, color="grey", lw=0.8, ls="--", label="base model file")
    bytes_ax.set(xlabel="tasks seen", ylabel="stored MB (files on disk)", title="storage growth")
    bytes_ax.set_yscale("log")
    for ax in (base_ax, bytes_ax):
        ax.legend(fontsize=7)
        ax.set_xticks(range(1, len(labels) + 1))
    for ax in flat[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
