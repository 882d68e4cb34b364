"""Running the benchmark: every method on every task and seed, its learning rate chosen on validation.

    frame = run_bench(params, quick=True, out_dir=Path("bench-results"))

Fairness rules (docs/benchmark.md, "One harness"): every method trains through the same loop
(`deltapatch.train.fit`) with the same recipe (`train:` in params.yaml: epochs, step budget, batch
size, warm-up, augmentation, label smoothing), on the same data and seeds. Each method's learning
rate is picked from ONE shared grid (`bench.lr_grid`) by its accuracy on the task's VALIDATION split
(ties: lower validation loss); the test split is evaluated only for the chosen run. The choice is
made on the first seed and reused for the other seeds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deltapatch.baselines import METHODS, BenchContext, Method
from deltapatch.bench.report import Curves, write_csv, write_markdown, write_plot, write_shots_plot
from deltapatch.bench.settings import COLUMNS, REFERENCE_METHOD, SHIFT_COLUMNS, BenchSettings
from deltapatch.config import ConfigError, section
from deltapatch.data.dataset import TaskData
from deltapatch.data.shifts import shifted
from deltapatch.data.sources import base_eval_data, capped, resolve_task, with_shots
from deltapatch.delta.budget import BudgetError
from deltapatch.errors import DeltapatchError
from deltapatch.evaluate import pristine_logits
from deltapatch.models.base import load_base
from deltapatch.models.pretrain import pretrain_base
from deltapatch.patching import DeltaSettings
from deltapatch.train import (
    FitResult,
    Normalizer,
    TrainSettings,
    accuracy,
    apply_threads,
    fit,
    predict_logits,
    resolve_device,
)

log = logging.getLogger(__name__)

HISTORIES = "histories.jsonl"  # per chosen run: its validation curve, for the time-to-accuracy column


@dataclass
class TrainedRun:
    """One method trained at one learning rate, scored on the validation split only."""

    method: Method
    lr: float
    fitted: FitResult
    val_acc: float
    val_loss: float
    train_seconds: float  # the training epochs only (no evaluation)

    @property
    def score(self) -> tuple[float, float]:
        """What the selection maximises: validation accuracy, then the lower validation loss."""
        return (self.val_acc, -self.val_loss)


@dataclass
class MethodRun:
    """One (method, task, seed) result: the csv row, its validation curve, notes for bench.md."""

    row: dict[str, Any]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (val_acc, cumulative train seconds)
    notes: list[str] = field(default_factory=list)


def select_by_validation(grid: list[float], train_at: Callable[[float], TrainedRun]) -> tuple[TrainedRun, list[TrainedRun]]:
    """Train at every lr of `grid`; return (the best run by validation score, all runs).

    The test split plays no part: `train_at` only ever reports validation numbers.
    """
    if not grid:
        raise ConfigError("bench.lr_grid is empty; give at least one learning rate")
    runs = [train_at(lr) for lr in grid]
    best = max(runs, key=lambda run: run.score)  # max keeps the first (smaller lr) on a full tie
    return best, runs


def method_settings(method_name: str, bench: BenchSettings) -> Any:
    cls = METHODS[method_name]
    try:
        return cls.settings_class(**dict(bench.method_options.get(method_name) or {}))
    except TypeError as exc:
        raise ConfigError(f"params.yaml bench.method_options.{method_name}: {exc}") from None


class TrainingCache:
    """Trained states shared by methods that train identically (PAINT trains exactly like full-ft,
    then interpolates), keyed by (training key, task, seed, lr)."""

    def __init__(self, keys_in_use: set[str]) -> None:
        self.keys_in_use = keys_in_use
        self.entries: dict[tuple[str, str, int, float], tuple[dict[str, torch.Tensor], FitResult, float]] = {}

    def clear(self) -> None:
        self.entries.clear()


def train_once(method_name: str, data: TaskData, context: BenchContext, bench: BenchSettings,
               train: TrainSettings, *, lr: float, seed: int, cache: TrainingCache, progress: bool) -> TrainedRun:
    """Build `method_name` for `data`, train it at `lr` with the shared loop, score it on validation."""
    cls = METHODS[method_name]
    method = cls(context, method_settings(method_name, bench))
    method_train = dataclasses.replace(train, epochs=bench.epochs, lr=lr)
    if bench.min_steps is not None:
        method_train = dataclasses.replace(method_train, min_steps=bench.min_steps)
    torch.manual_seed(seed)  # same head/Δ initialisation stream for every method
    trainable = method.prepare(data)
    key = (cls.training_key or cls.name, data.name, seed, lr)
    if key in cache.entries:
        state, fitted, seconds = cache.entries[key]
        trainable.load_state_dict(state)
    else:
        fitted = fit(trainable, data, method_train, context.norm, seed=seed, progress=progress,
                     desc=f"{method_name} on {data.name} (lr {lr:g}, seed {seed})")
        seconds = sum(r.seconds for r in fitted.history)
        if key[0] in cache.keys_in_use:
            cache.entries[key] = ({k: v.detach().clone() for k, v in trainable.state_dict().items()}, fitted, seconds)
    method.after_fit(data)
    logits = predict_logits(method.task_forward(), data.val, context.norm)
    val_loss = float(F.cross_entropy(logits, data.val.labels)) if len(data.val) else math.nan
    return TrainedRun(method, lr, fitted, accuracy(logits, data.val.labels), val_loss, seconds)


def measure(run: TrainedRun, data: TaskData, context: BenchContext, bench: BenchSettings, out_dir: Path,
            *, seed: int, base_total: int, base_file_bytes: int) -> MethodRun:
    """Everything in COLUMNS for the chosen run: test accuracy, base route, size, speed."""
    method, norm = run.method, context.norm
    patch_acc = accuracy(predict_logits(method.task_forward(), data.test, norm), data.test.labels)
    shift_accs = {SHIFT_COLUMNS[name]: accuracy(predict_logits(method.task_forward(), shifted(data.test, name), norm),
                                                data.test.labels) for name in bench.shifts}
    base_logits = predict_logits(method.base_forward(), context.base_data.test, norm)
    labels = context.base_data.test.labels
    base_acc = accuracy(base_logits, labels)
    folder = out_dir / "patches" / method.name / data.name
    size = method.save(folder)
    if not bench.keep_files:  # measured on disk; the copies themselves are not needed afterwards
        shutil.rmtree(folder, ignore_errors=True)
    unmerged, merged = _latencies(method, context, bench)
    step_ratio = _paired_step_ratio(method.name, data, context, bench)
    trainable_params = method.trainable_params()
    history = run.fitted.history
    row = {
        "method": method.name, "task": data.name, "patch_acc": patch_acc, "base_acc": base_acc,
        "base_acc_change": base_acc - accuracy(context.reference_logits, labels),
        "base_logits_max_abs_diff": float((base_logits - context.reference_logits).abs().max()),
        "trainable_params": trainable_params, "trainable_pct": 100.0 * trainable_params / base_total,
        "patch_bytes": size, "patch_pct": 100.0 * size / base_file_bytes,
        "train_s_per_epoch": run.fitted.seconds_per_epoch, "train_time_ratio_vs_full_ft": math.nan,
        "latency_ratio_merged": merged, "latency_ratio_unmerged": unmerged,
        "seed": seed, "lr": run.lr, "val_acc": run.val_acc, "epochs_run": len(history),
        "train_seconds": run.train_seconds, "time_to_full_ft_val_ratio": math.nan,
        "step_time_ratio_paired": step_ratio, **shift_accs,
    }
    elapsed, curve = 0.0, []
    for record in history:
        elapsed += record.seconds
        curve.append((record.val_acc, elapsed))
    return MethodRun(row, curve, _notes(method))


def _notes(method: Any) -> list[str]:
    """Method-specific facts bench.md reports (PAINT's α, PEFT's BatchNorm drift)."""
    notes = []
    if hasattr(method, "alpha_scores"):
        notes.append(f"α = {method.alpha:.2f} (val mean accuracy per α: "
                     + ", ".join(f"{a:g}→{s:.3f}" for a, s in method.alpha_scores.items()) + ")")
    if hasattr(method, "base_bn_stats_changed"):
        notes.append(f"base BatchNorm running stats changed by training: max |Δ| = {method.base_bn_stats_changed():.4g}")
    if getattr(method, "skipped_convs", 0):
        notes.append(f"{method.skipped_convs} convolution(s) PEFT's LoRA cannot wrap (depthwise, timm Conv2dSame) "
                     f"left frozen")
    return notes


def _latencies(method: Method, context: BenchContext, bench: BenchSettings) -> tuple[float, float]:
    """(unmerged, merged) latency ratios vs the pristine base; NaN where the method has no such path."""
    size = int(context.base.settings.input_size)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(bench.latency_batch, 3, size, size, generator=generator).to(context.device)
    reference = context.base.model.eval()
    unmerged = paired_latency_ratio(method.task_forward(), reference, x, bench.latency_repeats, bench.latency_warmup)
    with method.merged() as forward:
        merged = math.nan if forward is None else paired_latency_ratio(
            forward, reference, x, bench.latency_repeats, bench.latency_warmup)
    return unmerged, merged


def _paired_step_ratio(method_name: str, data: TaskData, context: BenchContext, bench: BenchSettings) -> float:
    """One training step of `method_name` ÷ one of full-ft, timed alternately on the same batch in
    this process (fresh, untrained copies of both): a per-step cost ratio that background load on a
    shared CPU cannot skew, beside the per-epoch ratio measured during the real runs."""
    if method_name == REFERENCE_METHOD:
        return 1.0
    steps = []
    for name in (method_name, REFERENCE_METHOD):
        torch.manual_seed(0)
        trainable = METHODS[name](context, method_settings(name, bench)).prepare(data)
        optimizer = torch.optim.Adam([p for p in trainable.parameters if p.requires_grad], lr=1e-4)
        steps.append(_train_step(trainable.module, optimizer))
    images = data.train.images[: bench.latency_batch]
    labels = data.train.labels[: bench.latency_batch].to(context.device)
    x = context.norm(images)
    return paired_ratio(lambda: steps[0](x, labels), lambda: steps[1](x, labels), bench.latency_repeats,
                        bench.latency_warmup, context.device)


def _train_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(x: torch.Tensor, labels: torch.Tensor) -> None:
        module.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), labels).backward()
        optimizer.step()

    return step


def paired_ratio(first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int,
                 device: torch.device) -> float:
    """median time of first() ÷ median time of second(), timed alternately (order flipped every
    round) so that background load on a shared CPU hits both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    functions = (first, second)
    for round_ in range(warmup + max(1, repeats)):
        for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            started = time.perf_counter()
            functions[which]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_ >= warmup:
                times[which].append(time.perf_counter() - started)
    return statistics.median(times[0]) / statistics.median(times[1])


@torch.no_grad()
def paired_latency_ratio(forward: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                         x: torch.Tensor, repeats: int, warmup: int) -> float:
    """median time of forward(x) ÷ median time of reference(x), x: (B, 3, H, W), timed alternately."""
    return paired_ratio(lambda: forward(x), lambda: reference(x), repeats, warmup, x.device)


# ---------------------------------------------------------------- the whole benchmark
def run_bench(params: dict[str, Any], methods: list[str] | None = None, tasks: list[str] | None = None,
              quick: bool = False, out_dir: Path = Path("bench-results"), progress: bool = True,
              epochs: int | None = None, seeds: int | None = None, resume: bool = False,
              shots: list[int] | None = None) -> pd.DataFrame:
    """Train and measure every method on every task, shot count and seed; write bench.csv/.md/.png;
    return the table. `shots`: K training images per class (0: the whole split), each K a task of its
    own in the table (`task-Kshot`); val and test are the task's, untouched.

    With `resume`, (method, task, seed) rows already in OUT/bench.csv are kept and not run again.
    """
    bench = section(params, "bench", BenchSettings).for_run(quick)
    if epochs is not None:
        bench = dataclasses.replace(bench, epochs=epochs)
    if seeds is not None:
        bench = dataclasses.replace(bench, seeds=seeds)
    if shots is not None:
        bench = dataclasses.replace(bench, shots=shots)
    shot_list = bench.shot_list()
    methods, task_specs = list(methods or bench.methods), list(tasks or bench.tasks)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise DeltapatchError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
    unknown_shifts = sorted(set(bench.shifts) - set(SHIFT_COLUMNS))
    if unknown_shifts:
        raise ConfigError(f"params.yaml bench.shifts: unknown {unknown_shifts}; known: {sorted(SHIFT_COLUMNS)}")
    first_seed = int(params.get("seed", 0))
    seed_list = bench.seed_list(first_seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, curves = _previous_results(out_dir) if resume else ([], {})
    finished = {(r["method"], r["task"], int(r["seed"])) for r in done}
    chosen_lr = {(r["method"], r["task"]): float(r["lr"]) for r in done if int(r["seed"]) == first_seed}
    if not resume:
        (out_dir / HISTORIES).unlink(missing_ok=True)
    context, train = open_context(params, bench, seed=first_seed, progress=progress)
    base_total = sum(p.numel() for p in context.base.model.parameters())
    base_file_bytes = context.base.weights_path.stat().st_size
    base_state = {k: v.clone() for k, v in context.base.model.state_dict().items()}
    shared_keys = [METHODS[m].training_key for m in methods if METHODS[m].training_key]
    cache = TrainingCache({k for k in shared_keys if shared_keys.count(k) > 1})
    runs: list[MethodRun] = []
    refused: list[str] = []
    with tempfile.TemporaryDirectory(prefix="deltapatch-bench-") as workdir:
        datasets = [capped(resolve_task(params, spec, Path(workdir), bench.images_per_class), bench, first_seed)
                    for spec in task_specs]
        jobs = [(d, k, m, s) for d in datasets for k in shot_list for s in seed_list for m in methods
                if (m, shots_label(d.name, k), s) not in finished]
        bar = tqdm(jobs, desc="bench", unit="run", disable=not progress)
        for task_data, shots_k, method, seed in bar:
            data = task_data if shots_k is None else dataclasses.replace(
                with_shots(task_data, shots_k, seed), name=shots_label(task_data.name, shots_k))
            bar.set_postfix(task=data.name, method=method, seed=seed)
            grid = _grid(method, data.name, bench, chosen_lr)

            def train_at(lr: float, data: TaskData = data, method: str = method, seed: int = seed) -> TrainedRun:
                return train_once(method, data, context, bench, train, lr=lr, seed=seed, cache=cache,
                                  progress=progress)

            try:
                best, _ = select_by_validation(grid, train_at)
            except BudgetError as exc:  # this method cannot fit delta.budget_pct on this base: a finding, not a crash
                refused.append(f"{method} / {data.name} / seed {seed}: not run, {exc}")
                continue
            chosen_lr.setdefault((method, data.name), best.lr)
            run = measure(best, data, context, bench, out_dir, seed=seed, base_total=base_total,
                          base_file_bytes=base_file_bytes)
            run.row["shots"] = math.nan if shots_k is None else shots_k
            runs.append(run)
            curves[(method, data.name, seed)] = run.curve
            with (out_dir / HISTORIES).open("a") as fh:
                fh.write(json.dumps({"method": method, "task": data.name, "seed": seed, "curve": run.curve}) + "\n")
            write_csv(done + [r.row for r in runs], curves, out_dir)  # partial results survive a crash
            if method == methods[-1]:
                cache.clear()
    untouched = all(torch.equal(v, context.base.model.state_dict()[k]) for k, v in base_state.items())
    frame = write_csv(done + [r.row for r in runs], curves, out_dir)
    default = f"delta-{section(params, 'delta', DeltaSettings).kind}"
    for note in refused:
        log.warning(note)
    write_markdown(frame, refused + [note for r in runs for note in _labelled_notes(r)], out_dir / "bench.md",
                   default_method=default, bench=bench, quick=quick, base_untouched=untouched,
                   overrides=list(params.get("_overrides", [])))
    write_plot(frame, out_dir / "bench.png")
    if frame["shots"].notna().any():
        write_shots_plot(frame, out_dir / "bench_shots.png")
    return frame


def shots_label(task: str, shots: int | None) -> str:
    """The table's task name of a few-shot run: `fashion-mnist-5shot`, `fashion-mnist-full` (a valid
    task name: each run trains a patch of that name)."""
    return task if shots is None else f"{task}-{shots}shot" if shots else f"{task}-full"


def _grid(method: str, task: str, bench: BenchSettings, chosen_lr: dict[tuple[str, str], float]) -> list[float]:
    """The lrs to try: the shared grid, a method's explicit `lr` option, or the lr chosen on the first seed."""
    if (method, task) in chosen_lr:
        return [chosen_lr[(method, task)]]
    explicit = (bench.method_options.get(method) or {}).get("lr")
    return [float(explicit)] if explicit is not None else [float(lr) for lr in bench.lr_grid]


def _labelled_notes(run: MethodRun) -> list[str]:
    return [f"{run.row['method']} / {run.row['task']} / seed {run.row['seed']}: {note}" for note in run.notes]


def _previous_results(out_dir: Path) -> tuple[list[dict[str, Any]], Curves]:
    """Rows of an earlier (partial) run in OUT/bench.csv and their validation curves."""
    csv = out_dir / "bench.csv"
    if not csv.is_file():
        return [], {}
    frame = pd.read_csv(csv)
    if list(frame.columns) != COLUMNS:
        raise ConfigError(f"{csv} has other columns than this version writes; use another --out or drop --resume")
    curves: Curves = {}
    histories = out_dir / HISTORIES
    if histories.is_file():
        for line in histories.read_text().splitlines():
            entry = json.loads(line)
            curves[(entry["method"], entry["task"], int(entry["seed"]))] = [(float(acc), float(seconds)) for acc, seconds in entry["curve"]]
    return frame.to_dict("records"), curves


def open_context(params: dict[str, Any], bench: BenchSettings, *, seed: int,
                 progress: bool) -> tuple[BenchContext, TrainSettings]:
    """Load (pre-training if missing) the base model and its pristine base-test logits."""
    train = section(params, "train", TrainSettings)
    apply_threads(train)
    device = resolve_device(train.device)
    pretrain_base(params, progress=progress)
    base = load_base(params, device)
    norm = Normalizer(base.settings.mean, base.settings.std, device)
    base_data = capped(base_eval_data(params, base), bench, seed)
    reference = pristine_logits(base.model, base_data.test, norm)
    recipe = dataclasses.replace(train, epochs=bench.epochs, min_steps=train.min_steps if bench.min_steps is None
                                 else bench.min_steps)
    return BenchContext(params, base, norm, base_data, reference, device, recipe=recipe), train
