"""Rank allocation under the same budget: uniform vs proportional vs AdaLoRA-style importance
(the budget: README, "Budget"). Same base, recipe (params.yaml `train:`)
and seed for every variant; one JSON line per (task, seed, variant), resumable.

    python benchmarks/allocation_study.py PROJECT OUT.jsonl --tasks glyphs,shapes --seeds 0,1 \
        --variants uniform,proportional,importance

`importance` runs a pilot patch (budget-sized; the recipe's step budget) to score every Δ layer
(`deltapatch.delta.importance.layer_importance`), re-allocates the same budget with those weights,
then trains the real patch from zero; its pilot time is reported apart (`pilot_s`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from deltapatch.config import load_params, section
from deltapatch.data.sources import builtin_task
from deltapatch.delta.importance import with_importance_ranks
from deltapatch.delta.kinds.lowrank import LowRankConfig
from deltapatch.patching import DeltaSettings, open_session, train_patch
from deltapatch.train import TrainSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", default="glyphs,shapes")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default="uniform,proportional,importance")
    args = parser.parse_args(argv)
    params = load_params(args.project)
    budget = section(params, "delta", DeltaSettings).budget_pct or 3.0
    session = open_session(params)
    done = set()
    if args.out.exists():
        done = {(r["task"], r["seed"], r["variant"]) for r in map(json.loads, args.out.read_text().splitlines())}
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks.split(","):
            data = builtin_task(params, task)
            for variant in args.variants.split(","):
                if (task, seed, variant) in done:
                    continue
                run = copy.deepcopy(params)
                run["seed"] = seed
                if task in session.net.tasks:
                    session.net.remove_task(task)
                pilot_s = 0.0
                run["delta"]["lowrank"] = {"allocation": variant}
                if variant == "importance":  # the pilot apart, timed (train_patch would run the same call)
                    started = time.perf_counter()
                    torch.manual_seed(seed)
                    config = with_importance_ranks(session.net, task, data, LowRankConfig(budget_pct=budget, allocation=variant),
                                                   section(run, "train", TrainSettings), session.norm, seed=seed)
                    pilot_s = time.perf_counter() - started
                    assert isinstance(config, LowRankConfig)
                    run["delta"]["lowrank"] = {"allocation": variant, "ranks": config.ranks}
                run["delta"]["budget_pct"] = budget  # the same budget for every variant, whatever the project sets
                started = time.perf_counter()
                result = train_patch(run, data, out_dir=args.out.parent / "patches" / f"{task}-{variant}-{seed}",
                                     session=session, progress=False)
                row = {"task": task, "seed": seed, "variant": variant, "patch_acc": result.metrics["patch_acc"],
                       "val_acc": result.metrics["val_acc"], "trainable_pct": result.metrics["trainable_pct"],
                       "train_s": time.perf_counter() - started, "pilot_s": pilot_s,
                       "ranks": session.net.task_configs[task].ranks}
                print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
