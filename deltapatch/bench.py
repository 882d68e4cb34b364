"""The benchmark: every method on every embedded patch task, in one harness.

    df = run_bench(params, quick=True, out_dir=Path("bench-results"))

Same data, epochs, batch size, seed and training loop (`deltapatch.train.fit`) for every method;
only the learning rate may differ per method (params.yaml `bench.method_options.<name>.lr`).
Writes `bench.csv` (COLUMNS, one row per (method, task)), `bench.md` and `bench.png`.
Semantics of every column: docs/benchmark.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltapatch.config import ConfigError, section
from deltapatch.data.dataset import TaskData
from deltapatch.errors import DeltapatchError
from deltapatch.train import TrainSettings

COLUMNS = [
    "method", "task", "patch_acc", "base_acc", "base_acc_change", "base_logits_max_abs_diff",
    "trainable_params", "trainable_pct", "patch_bytes", "patch_pct", "train_s_per_epoch",
    "train_time_ratio_vs_full_ft", "latency_ratio_merged", "latency_ratio_unmerged",
]
REFERENCE_METHOD = "full-ft"


@dataclass
class BenchSettings:
    """params.yaml `bench:` section. `quick` holds overrides of these fields for `--quick`."""

    methods: list[str] = field(default_factory=lambda: ["delta-channel", "delta-lowrank", "full-ft",
                                                        "linear-probe", "bn-patch", "paint", "peft-lora"])
    tasks: list[str] = field(default_factory=lambda: ["digits-inverted", "digits-rot90", "digits-parity",
                                                      "glyphs", "shapes"])
    epochs: int = 6
    max_train_per_class: int | None = None  # cap on training images per class (None: all)
    max_eval_per_class: int | None = None  # cap on val/test images per class, base task too (None: all)
    keep_files: bool = False  # keep OUT/patches/<method>/<task>/ (full-ft/paint: a 45 MB model each)
    latency_batch: int = 64
    latency_repeats: int = 5
    latency_warmup: int = 2
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {full-ft: {lr: 0.001}}
    quick: dict[str, Any] = field(default_factory=dict)

    def for_run(self, quick: bool) -> BenchSettings:
        """These settings with the `quick` overrides applied when asked for."""
        if not quick:
            return self
        known = {f.name for f in dataclasses.fields(self)} - {"quick"}
        unknown = sorted(set(self.quick) - known)
        if unknown:
            raise ConfigError(f"params.yaml: unknown key(s) {unknown} in bench.quick; known: {sorted(known)}")
        overrides = dict(self.quick)
        options = {m: dict(o or {}) for m, o in self.method_options.items()}
        for method, extra in (overrides.pop("method_options", None) or {}).items():
            options[method] = {**options.get(method, {}), **(extra or {})}  # merged per method
        return dataclasses.replace(self, **overrides, method_options=options)


@dataclass
class MethodRun:
    """One (method, task) result: the csv row plus notes for bench.md."""

    row: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- running one method on one task
def run_method(method_name: str, data: TaskData, context: Any, bench: BenchSettings, train: TrainSettings,
               out_dir: Path, *, seed: int, base_total: int, base_file_bytes: int, progress: bool) -> MethodRun:
    """Train `method_name` on `data` with the shared loop, then measure everything in COLUMNS."""
    from deltapatch.baselines import METHODS
    from deltapatch.train import accuracy, fit, predict_logits

    cls = METHODS[method_name]
    options = dict(bench.method_options.get(method_name) or {})
    try:
        settings = cls.settings_class(**options)
    except TypeError as exc:
        raise ConfigError(f"params.yaml bench.method_options.{method_name}: {exc}") from None
    method_train = dataclasses.replace(train, epochs=bench.epochs, lr=settings.lr or train.lr)
    method = cls(context, settings)
    torch.manual_seed(seed)  # same head/Δ initialisation stream for every method
    trainable = method.prepare(data)
    fitted = fit(trainable, data, method_train, context.norm, seed=seed, progress=progress,
                 desc=f"{method_name} on {data.name}")
    method.after_fit(data)
    norm = context.norm
    patch_acc = accuracy(predict_logits(method.task_forward(), data.test, norm), data.test.labels)
    base_logits = predict_logits(method.base_forward(), context.base_data.test, norm)
    labels = context.base_data.test.labels
    pristine_acc = accuracy(context.reference_logits, labels)
    base_acc = accuracy(base_logits, labels)
    folder = out_dir / "patches" / method_name / data.name
    size = method.save(folder)
    if not bench.keep_files:  # measured on disk; the copies themselves are not needed afterwards
        shutil.rmtree(folder, ignore_errors=True)
    unmerged, merged = _latencies(method, context, bench)
    trainable_params = method.trainable_params()
    row = {
        "method": method_name, "task": data.name, "patch_acc": patch_acc, "base_acc": base_acc,
        "base_acc_change": base_acc - pristine_acc,
        "base_logits_max_abs_diff": float((base_logits - context.reference_logits).abs().max()),
        "trainable_params": trainable_params, "trainable_pct": 100.0 * trainable_params / base_total,
        "patch_bytes": size, "patch_pct": 100.0 * size / base_file_bytes,
        "train_s_per_epoch": fitted.seconds_per_epoch, "train_time_ratio_vs_full_ft": math.nan,
        "latency_ratio_merged": merged, "latency_ratio_unmerged": unmerged,
    }
    return MethodRun(row, _notes(method))


def _notes(method: Any) -> list[str]:
    """Method-specific facts bench.md reports (PAINT's α, PEFT's BatchNorm drift)."""
    notes = []
    if hasattr(method, "alpha_scores"):
        notes.append(f"α = {method.alpha:.2f} (val mean accuracy per α: "
                     + ", ".join(f"{a:g}→{s:.3f}" for a, s in method.alpha_scores.items()) + ")")
    if hasattr(method, "base_bn_stats_changed"):
        notes.append(f"base BatchNorm running stats changed by training: max |Δ| = {method.base_bn_stats_changed():.4g}")
    return notes


def _latencies(method: Any, context: Any, bench: BenchSettings) -> tuple[float, float]:
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


@torch.no_grad()
def paired_latency_ratio(forward: Callable[[torch.Tensor], torch.Tensor], reference: Callable[[torch.Tensor], torch.Tensor],
                         x: torch.Tensor, repeats: int, warmup: int) -> float:
    """median time of forward(x) ÷ median time of reference(x), x: (B, 3, H, W).

    The two are timed alternately (order flipped every round) so that background load on a shared
    CPU hits both alike.
    """
    times: dict[int, list[float]] = {0: [], 1: []}
    functions = (forward, reference)
    for round_ in range(warmup + max(1, repeats)):
        for which in ((0, 1) if round_ % 2 == 0 else (1, 0)):
            started = time.perf_counter()
            functions[which](x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            if round_ >= warmup:
                times[which].append(time.perf_counter() - started)
    return statistics.median(times[0]) / statistics.median(times[1])


# ---------------------------------------------------------------- the whole benchmark
def run_bench(params: dict[str, Any], methods: list[str] | None = None, tasks: list[str] | None = None,
              quick: bool = False, out_dir: Path = Path("bench-results"), progress: bool = True,
              epochs: int | None = None) -> Any:
    """Train and measure every method on every task; write bench.csv/.md/.png; return the DataFrame."""
    import pandas as pd
    from tqdm.auto import tqdm

    from deltapatch.baselines import METHODS
    from deltapatch.data.sources import builtin_task

    bench = section(params, "bench", BenchSettings).for_run(quick)
    if epochs is not None:
        bench = dataclasses.replace(bench, epochs=epochs)
    methods, tasks = list(methods or bench.methods), list(tasks or bench.tasks)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise DeltapatchError(f"unknown method(s) {unknown}; available: {sorted(METHODS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context, train = _open_context(params, bench, seed=int(params.get("seed", 0)), progress=progress)
    seed = int(params.get("seed", 0))
    base_total = sum(p.numel() for p in context.base.model.parameters())
    base_file_bytes = context.base.weights_path.stat().st_size
    base_state = {k: v.clone() for k, v in context.base.model.state_dict().items()}
    runs: list[MethodRun] = []
    pairs = [(t, m) for t in tasks for m in methods]
    bar = tqdm(pairs, desc="bench", unit="run", disable=not progress)
    data = None
    for task, method in bar:
        bar.set_postfix(task=task, method=method)
        if data is None or data.name != task:
            data = _task_data(params, task, bench, seed, builtin_task)
        runs.append(run_method(method, data, context, bench, train, out_dir, seed=seed, base_total=base_total,
                               base_file_bytes=base_file_bytes, progress=progress))
        _write_csv(pd.DataFrame([r.row for r in runs]), out_dir)  # partial results survive a crash
    untouched = all(torch.equal(v, context.base.model.state_dict()[k]) for k, v in base_state.items())
    frame = _write_csv(pd.DataFrame([r.row for r in runs]), out_dir)
    from deltapatch.patching import DeltaSettings

    default = f"delta-{section(params, 'delta', DeltaSettings).kind}"
    write_markdown(frame, runs, out_dir / "bench.md", default_method=default, bench=bench, quick=quick,
                   base_untouched=untouched)
    write_plot(frame, out_dir / "bench.png")
    return frame


def _open_context(params: dict[str, Any], bench: BenchSettings, *, seed: int,
                  progress: bool) -> tuple[Any, TrainSettings]:
    """Load (pre-training if missing) the base model and its pristine base-test logits."""
    from deltapatch.baselines import BenchContext
    from deltapatch.data.sources import base_eval_data
    from deltapatch.evaluate import pristine_logits
    from deltapatch.models.base import load_base
    from deltapatch.models.pretrain import pretrain_base
    from deltapatch.train import Normalizer, apply_threads, resolve_device

    train = section(params, "train", TrainSettings)
    apply_threads(train)
    device = resolve_device(train.device)
    pretrain_base(params, progress=progress)
    base = load_base(params, device)
    norm = Normalizer(base.settings.mean, base.settings.std, device)
    base_data = _capped(base_eval_data(params), bench, seed)
    reference = pristine_logits(base.model, base_data.test, norm)
    return BenchContext(params, base, norm, base_data, reference, device), train


def _task_data(params: dict[str, Any], task: str, bench: BenchSettings, seed: int, loader: Callable) -> TaskData:
    return _capped(loader(params, task), bench, seed)


def _capped(data: TaskData, bench: BenchSettings, seed: int) -> TaskData:
    """`data` with the per-class caps of `bench` applied (class-balanced, deterministic)."""
    data = copy.copy(data)
    if bench.max_train_per_class:
        data.train = data.train.limit_per_class(int(bench.max_train_per_class), seed)
    if bench.max_eval_per_class:
        data.val = data.val.limit_per_class(int(bench.max_eval_per_class), seed)
        data.test = data.test.limit_per_class(int(bench.max_eval_per_class), seed)
    return data


def _write_csv(frame: Any, out_dir: Path) -> Any:
    """Add the full-ft time ratio and write bench.csv with exactly COLUMNS (NaN → empty)."""
    frame = frame.copy()
    reference = frame[frame["method"] == REFERENCE_METHOD].set_index("task")["train_s_per_epoch"]
    frame["train_time_ratio_vs_full_ft"] = [
        row.train_s_per_epoch / reference[row.task] if row.task in reference.index else math.nan
        for row in frame.itertuples()
    ]
    frame = frame[COLUMNS]
    frame.to_csv(out_dir / "bench.csv", index=False)
    return frame


# ---------------------------------------------------------------- reporting
TARGETS: list[tuple[str, str]] = [
    ("base_logits_max_abs_diff == 0 on every task", "max base_logits_max_abs_diff"),
    ("base_acc_change == 0 on every task", "max |base_acc_change|"),
    ("mean patch_acc ≥ full-ft mean − 0.01", "mean patch_acc − (full-ft − 0.01)"),
    ("mean patch_acc ≥ paint, bn-patch, linear-probe means", "mean patch_acc − best of them"),
    ("trainable_pct ≤ 3", "max trainable_pct"),
    ("patch_pct ≤ 3", "max patch_pct"),
    ("train_time_ratio_vs_full_ft ≤ 0.85", "mean train_time_ratio_vs_full_ft"),
    ("latency_ratio_merged ≤ 1.05", "mean latency_ratio_merged"),
]


def target_checks(frame: Any, method: str) -> list[tuple[str, str, float]]:
    """[(target, PASS/MISS/n/a, measured)] for `method` over the tasks in `frame`."""
    rows = frame[frame["method"] == method]
    means = frame.groupby("method")["patch_acc"].mean()
    if rows.empty:
        return []
    mine = float(rows["patch_acc"].mean())
    others = [means[m] for m in ("paint", "bn-patch", "linear-probe") if m in means]
    measured = [
        (float(rows["base_logits_max_abs_diff"].max()), lambda v: v == 0),
        (float(rows["base_acc_change"].abs().max()), lambda v: v == 0),
        (mine - (means[REFERENCE_METHOD] - 0.01) if REFERENCE_METHOD in means else math.nan, lambda v: v >= 0),
        (mine - max(others) if others else math.nan, lambda v: v >= 0),
        (float(rows["trainable_pct"].max()), lambda v: v <= 3),
        (float(rows["patch_pct"].max()), lambda v: v <= 3),
        (float(rows["train_time_ratio_vs_full_ft"].mean()), lambda v: v <= 0.85),
        (float(rows["latency_ratio_merged"].mean()), lambda v: v <= 1.05),
    ]
    return [
        (target, "n/a" if math.isnan(value) else ("PASS" if ok(value) else "MISS"), value)
        for (target, _), (value, ok) in zip(TARGETS, measured, strict=True)
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _table(frame: Any) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *lines])


def write_markdown(frame: Any, runs: list[MethodRun], path: Path, *, default_method: str, bench: BenchSettings,
                   quick: bool, base_untouched: bool) -> None:
    """bench.md: settings, per-method means, the target check of the default Δ kind, all rows, notes."""
    means = frame.drop(columns=["task"]).groupby("method", sort=False).mean(numeric_only=True).reset_index()
    parts = [
        "# deltapatch benchmark" + (" (quick)" if quick else ""),
        f"epochs {bench.epochs}, max_train_per_class {bench.max_train_per_class or 'all'}, "
        f"latency batch {bench.latency_batch} × {bench.latency_repeats} repeats; tasks: "
        f"{', '.join(dict.fromkeys(frame['task']))}",
        "## Mean over tasks", _table(means),
        f"## Targets for the default Δ kind ({default_method})",
        "| target | result | measured |\n|---|---|---|",
    ]
    checks = target_checks(frame, default_method)
    parts[-1] += "".join(f"\n| {t} | {r} | {_fmt(v)} |" for t, r, v in checks) if checks else "\n| (not run) | n/a | |"
    notes = [f"- pristine base model unchanged after every method: {'yes' if base_untouched else 'NO'}"]
    notes += [f"- {r.row['method']} / {r.row['task']}: {note}" for r in runs for note in r.notes]
    parts += ["## All runs", _table(frame), "## Notes", "\n".join(notes)]
    path.write_text("\n\n".join(parts) + "\n")


def write_plot(frame: Any, path: Path) -> None:
    """bench.png: (left) mean patch_acc vs mean base_acc_change per method; (right) patch_acc per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    pivot = frame.pivot(index="task", columns="method", values="patch_acc")[list(means.index)]
    pivot.plot.bar(ax=right, rot=20, width=0.85)
    right.set(ylabel="patch accuracy", title="patch accuracy per task", ylim=(0, 1.05))
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
