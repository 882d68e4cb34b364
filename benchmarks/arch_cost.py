"""Per-architecture cost of a Δ-patch, measured robustly on a shared CPU (the budget: README,
"Budget"): the patch's size under `delta.budget_pct`, its training-step time against full
fine-tuning, and its serving latency merged/unmerged against the pristine base.

    python benchmarks/arch_cost.py PROJECT [PROJECT ...] [--steps 8] [--batch 64] --out cost.csv

Each PROJECT is a scratch deltapatch project whose base is pre-trained (`deltapatch pretrain`), with
`delta.budget_pct` as in its params.yaml (null measures one rank everywhere).
Training steps of the Δ and of full fine-tuning are timed ALTERNATELY (order flipped every round,
medians compared), like the bench's latencies, so background load hits both alike; a per-step
ratio equals the per-epoch ratio on the same data. Inputs are random (timing only).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deltapatch.baselines.base import classifier_from, split_head
from deltapatch.bench import paired_latency_ratio
from deltapatch.config import load_params, section
from deltapatch.data.sources import builtin_task
from deltapatch.delta import DeltaNetwork, make_config
from deltapatch.delta.importance import with_importance_ranks
from deltapatch.models.base import load_base
from deltapatch.patching import DeltaSettings
from deltapatch.train import Normalizer, TrainSettings


def _step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    started = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(module(x), y).backward()
    optimizer.step()
    return time.perf_counter() - started


def measure(project: Path, steps: int, batch: int, warmup: int = 2, pilot_task: str = "glyphs") -> dict[str, object]:
    """`pilot_task`: the built-in task whose pilot training sizes the ranks when the project asks for
    `delta.lowrank.allocation: importance` (the same pilot as its bench ran, so the same ranks)."""
    params = load_params(project)
    base = load_base(params)
    delta = section(params, "delta", DeltaSettings)
    size = int(base.settings.input_size)

    net = DeltaNetwork(copy.deepcopy(base.model))
    config = make_config(delta.kind, delta.options(delta.kind))
    data = builtin_task(params, pilot_task)
    torch.manual_seed(int(params.get("seed", 0)))
    config = with_importance_ranks(net, "t", data, config, section(params, "train", TrainSettings),
                                   Normalizer(base.settings.mean, base.settings.std, torch.device("cpu")),
                                   seed=int(params.get("seed", 0)))
    num_classes = data.num_classes
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, num_classes, (batch,), generator=generator)
    net.add_task("t", num_classes, config)
    net.select("t").train()
    trainable, total = net.parameter_counts("t")
    state = net.task_state_dict("t")
    stored = sum(t.numel() for t in state.values())
    _, base_head = split_head(base.model)
    full = copy.deepcopy(base.model)
    for param in full.parameters():
        param.requires_grad_(True)
    full = classifier_from(full, num_classes, base_head, torch.device("cpu")).train()
    runs = {"delta": (net, torch.optim.Adam(net.task_parameters("t"), lr=1e-3)),
            "full": (full, torch.optim.Adam(full.parameters(), lr=1e-3))}
    times: dict[str, list[float]] = {"delta": [], "full": []}
    for round_ in range(warmup + steps):
        for name in (("delta", "full") if round_ % 2 == 0 else ("full", "delta")):
            seconds = _step(*runs[name], x, y)
            if round_ >= warmup:
                times[name].append(seconds)
    net.eval()
    reference = base.model.eval()
    unmerged = paired_latency_ratio(net, reference, x, repeats=steps, warmup=warmup)
    net.merge("t")
    merged = paired_latency_ratio(net, reference, x, repeats=steps, warmup=warmup)
    net.unmerge()
    config = net.task_configs["t"]
    ranks = getattr(config, "ranks", {})
    return {
        "arch": base.settings.arch, "allocation": getattr(config, "allocation", ""), "base_params": total,
        "trainable_pct": round(100 * trainable / total, 3),
        "stored_pct": round(100 * stored / total, 3),
        "ranks_min_median_max": "/".join(str(v) for v in (min(ranks.values()), int(statistics.median(ranks.values())),
                                                         max(ranks.values()))) if ranks else "",
        "layers_without_delta": sum(1 for r in ranks.values() if r == 0),
        "delta_step_s": round(statistics.median(times["delta"]), 4), "full_ft_step_s": round(statistics.median(times["full"]), 4),
        "step_time_ratio": round(statistics.median(times["delta"]) / statistics.median(times["full"]), 3),
        "latency_ratio_unmerged": round(unmerged, 3), "latency_ratio_merged": round(merged, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("projects", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("arch-cost.csv"))
    args = parser.parse_args(argv)
    rows = [measure(project, args.steps, args.batch) for project in args.projects]
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
