"""The "Other architectures" table of docs/benchmark.md: one row per base architecture, from a
`deltapatch bench` of delta-lowrank and full-ft in each project plus `arch_cost.measure` (paired
step and latency timings).

    python -m benchmarks.arch_table PROJECT [PROJECT ...] --bench-dir bench --out arch.md   # from the repo root

Each PROJECT is a scratch deltapatch project (its own base.arch, base pre-trained by `deltapatch
pretrain`) in which `deltapatch bench --methods delta-lowrank,full-ft --out bench` has run. Prints
the markdown table and writes it (and a csv beside it).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import pandas as pd

from benchmarks.arch_cost import measure
from deltapatch.config import load_params, section
from deltapatch.patching import DeltaSettings

DELTA, FULL = "delta-lowrank", "full-ft"


def _allocation(asked: str, used: str) -> str:
    """What params.yaml asks for, and what `auto` settled on for this base."""
    return asked if asked == used or not used else f"{asked} → {used}"


def row_for(project: Path, bench_dir: str, steps: int, batch: int) -> dict[str, object]:
    bench = pd.read_csv(project / bench_dir / "bench.csv")
    delta = bench[bench.method == DELTA].set_index("task")
    full = bench[bench.method == FULL].set_index("task")
    cost = measure(project, steps, batch, pilot_task=str(delta.index[0]))
    settings = section(load_params(project), "delta", DeltaSettings)
    base_acc = json.loads((project / "models" / "base.json").read_text()).get("metrics", {}).get("test_acc")
    gaps = {task: float(delta.patch_acc[task] - full.patch_acc[task]) for task in delta.index}
    return {
        "arch": cost["arch"],
        "base_test_acc": round(float(base_acc), 3) if base_acc is not None else "",
        "budget_pct": settings.budget_pct,
        "allocation": _allocation(str(settings.lowrank.get("allocation", "uniform")), str(cost["allocation"])),
        "trainable_pct": round(float(delta.trainable_pct.max()), 2),
        "patch_pct": round(float(delta.patch_pct.max()), 2),
        "layers_without_delta": cost["layers_without_delta"],
        "ranks_min_median_max": cost["ranks_min_median_max"],
        "base_bit_identical": bool((delta.base_logits_max_abs_diff == 0).all() and (delta.base_acc_change == 0).all()),
        "delta_acc": "; ".join(f"{t} {delta.patch_acc[t]:.3f}" for t in delta.index),
        "full_ft_acc": "; ".join(f"{t} {full.patch_acc[t]:.3f}" for t in full.index),
        "worst_gap_vs_full_ft": round(min(gaps.values()), 3),
        "epoch_time_ratio": round(float(delta.train_time_ratio_vs_full_ft.mean()), 3),
        "step_time_ratio_paired": cost["step_time_ratio"],
        "latency_ratio_merged": cost["latency_ratio_merged"],
        "latency_ratio_merged_bench": round(float(delta.latency_ratio_merged.max()), 3),
        "lr_delta_full": "; ".join(f"{t} {delta.lr[t]:g}/{full.lr[t]:g}" for t in delta.index),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", nargs="+", type=Path)
    parser.add_argument("--bench-dir", default="bench")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("arch.md"))
    args = parser.parse_args(argv)
    rows = [row_for(project, args.bench_dir, args.steps, args.batch) for project in args.projects]
    with args.out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
