"""The mixed-task forward against the bare base forward, in one process (bench-serve's forward rows).

    result = measure_mixed_forward(predictor, x, routes=6)    # the served champions and the base
    result = measure_mixed_forward(predictor, x, routes=50)   # + synthetic copies of a champion

The two forwards are timed in alternating rounds and the ratio is the median of the rounds' ratios,
so a machine that gets busier or quieter during the run moves both alike. The batch cycles over
the routes (base included), as a dynamic batcher's mixed batch would. Synthetic patches are copies
of a served champion (same ranks, norm layers, head) with their tensors moved by noise: what the
speed and memory figures need, not a trained task.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from deltapatch.delta.routing import BASE
from deltapatch.registry.runtime import Predictor

ROUNDS = 7  # alternating timed rounds per figure; the median ratio is reported


@dataclass(frozen=True)
class MixedForwardResult:
    routes: int                       # tasks in the batch, the base included
    bare: float                       # images/s of the bare base model's forward (median round)
    mixed: float                      # images/s of the mixed-task forward (median round)
    ratio: float                      # median over rounds of mixed/bare
    rss_per_patch_mb: float | None    # resident memory added per synthetic patch (None: none added)
    patch_file_mb: float | None       # the copied champion's patch.safetensors (None: none added)


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc/self/statm), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def patch_file_mb(predictor: Predictor, task: str) -> float:
    """Size of `task`'s patch.safetensors as save_patch writes it (the served copy's folder is gone)."""
    tensors = {key: value.contiguous() for key, value in predictor.net.task_state_dict(task).items()}
    return len(save(tensors)) / 2**20


def add_synthetic_patches(predictor: Predictor, like: str, count: int, seed: int = 0) -> list[str]:
    """`count` copies of the served patch `like` under new names (`synthetic-<i>`), each with its
    tensors moved by a little noise, loaded into the predictor's network (not served)."""
    net = predictor.net
    state = net.task_state_dict(like)
    classes = int(state[f"{net.head_name}.weight"].shape[0])
    generator = torch.Generator().manual_seed(seed)
    names = []
    with predictor.lock, torch.no_grad():
        for i in range(count):
            name = f"synthetic-{i}"
            net.add_task(name, classes, net.task_configs[like])
            net.load_task_state_dict(name, {key: value + 0.01 * torch.randn(value.shape, generator=generator)
                                            if value.is_floating_point() else value for key, value in state.items()})
            names.append(name)
        net.eval()
    predictor.prepare()
    return names


def interleaved_rates(bare: Callable[[], object], mixed: Callable[[], object], images: int, repeats: int,
                      rounds: int = ROUNDS) -> tuple[float, float, float]:
    """(bare images/s, mixed images/s, median ratio mixed/bare) over `rounds` alternating rounds of
    `repeats` forwards each, after 3 warm-up forwards of each."""
    with torch.inference_mode():
        for _ in range(3):
            bare()
            mixed()
        bare_rates: list[float] = []
        mixed_rates: list[float] = []
        for _ in range(rounds):
            for forward, rates in ((bare, bare_rates), (mixed, mixed_rates)):
                start = time.perf_counter()
                for _ in range(repeats):
                    forward()
                rates.append(images * repeats / (time.perf_counter() - start))
    ratios = [m / b for m, b in zip(mixed_rates, bare_rates, strict=True)]
    return statistics.median(bare_rates), statistics.median(mixed_rates), statistics.median(ratios)


def measure_mixed_forward(predictor: Predictor, base_model: torch.nn.Module, x: torch.Tensor, routes: int,
                          repeats: int = 10) -> MixedForwardResult:
    """The mixed forward over `routes` routes (the base and the served patches, topped up with
    synthetic copies of the first served one) against `base_model(x)`; x: (N, 3, H, W) normalised."""
    served = list(predictor.patches)
    if not served:
        raise ValueError("measure_mixed_forward needs at least one served patch to mix with the base")
    extra = max(0, routes - 1 - len(served))
    rss, patch_mb, synthetic = None, None, []
    if extra:
        gc.collect()
        before = rss_mb()
        synthetic = add_synthetic_patches(predictor, served[0], extra)
        gc.collect()
        rss = (rss_mb() - before) / extra
        patch_mb = patch_file_mb(predictor, served[0])
    try:
        names = [BASE, *served, *synthetic][:routes]
        # Every route once per batch where the batch holds them all, else a spread of them.
        spread = len(names) > len(x)
        tasks = [names[(i * len(names)) // len(x) if spread else i % len(names)] for i in range(len(x))]
        net = predictor.net
        with predictor.lock:
            bare, mixed, ratio = interleaved_rates(lambda: base_model(x), lambda: net(x, tasks=tasks), len(x), repeats)
    finally:
        with predictor.lock:
            for name in synthetic:
                predictor.net.remove_task(name)
        predictor.prepare()
    return MixedForwardResult(len(names), bare, mixed, ratio, rss, patch_mb)
