"""The continual-learning stream: every strategy learns the same tasks in the same order.

    result = run_stream(params, quick=True, out_dir=Path("stream-results"))

Task 0 is the base task (learned by pre-training), then the patch tasks arrive one by one. After
each arrival every task seen so far is evaluated on its test split, giving the accuracy matrix
R[i][j]; the files each strategy must keep are written to OUT/store/<strategy>/ and their size on
disk is recorded. Same data, epochs, batch size, seed and training loop (`deltapatch.train.fit`)
for every strategy; only the learning rate may differ (`stream.strategy_options.<name>.lr`).
Writes stream.csv, stream.md and stream.png (deltapatch/stream/report.py) and, when a tracking
URI is configured, logs everything to one MLflow run (deltapatch/stream/tracking.py).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltapatch.baselines.base import folder_bytes, replace_module, split_head
from deltapatch.bench import BenchSettings
from deltapatch.config import ConfigError, section
from deltapatch.data.dataset import Split, TaskData
from deltapatch.data.sources import base_eval_data, capped, resolve_task
from deltapatch.delta.routing import BASE
from deltapatch.errors import DeltapatchError
from deltapatch.models.base import load_base
from deltapatch.models.pretrain import pretrain_base
from deltapatch.stream import report, tracking
from deltapatch.stream.results import Arrival, StrategyRun, StreamResult
from deltapatch.stream.settings import StreamSettings
from deltapatch.stream.strategies import STRATEGIES, Strategy, StreamContext
from deltapatch.train import (
    Normalizer,
    TrainSettings,
    accuracy,
    apply_threads,
    fit,
    predict_logits,
    resolve_device,
)


# ---------------------------------------------------------------- tasks and context
def open_context(params: dict[str, Any], settings: StreamSettings, *,
                 progress: bool) -> tuple[StreamContext, TrainSettings, TaskData]:
    """Load (pre-training if missing) the base model; return the context, the train settings and
    the (capped) base task named after params.yaml base.task."""

    train = section(params, "train", TrainSettings)
    apply_threads(train)
    device = resolve_device(train.device)
    pretrain_base(params, progress=progress)
    base = load_base(params, device)
    seed = int(params.get("seed", 0))
    norm = Normalizer(base.settings.mean, base.settings.std, device)
    base_data = capped(base_eval_data(params), settings, seed)
    base_data.name = base.settings.task
    return StreamContext(params, base, norm, device, int(train.batch_size), seed), train, base_data


# ---------------------------------------------------------------- one strategy over the stream
class _Evaluator:
    """Test-split accuracies, the pristine base logits, and pristine features for forward transfer."""

    def __init__(self, context: StreamContext, stream: list[TaskData]) -> None:
        self.context = context
        self.stream = stream
        base_model = context.base.model.eval()
        self.reference = predict_logits(base_model, stream[0].test, context.norm)
        features = copy.deepcopy(base_model)
        replace_module(features, split_head(features)[0], nn.Identity())
        self._features_model = features
        self._features: dict[str, torch.Tensor] = {}

    def accuracy(self, forward: Any, split: Split) -> tuple[float, torch.Tensor]:
        logits = predict_logits(forward, split, self.context.norm)
        return accuracy(logits, split.labels), logits

    def at_init(self, head: nn.Linear, data: TaskData) -> float:
        """Accuracy of `head` (untrained) on the pristine base features of `data.test` (b_j of FWT)."""
        if data.name not in self._features:
            self._features[data.name] = predict_logits(self._features_model, data.test, self.context.norm)
        with torch.no_grad():
            logits = copy.deepcopy(head).float().cpu()(self._features[data.name])
        return accuracy(logits, data.test.labels)

    def arrival(self, strategy: Strategy, seen: int, seconds: float, store: Path) -> Arrival:
        strategy.save(store)
        stored = folder_bytes(store)
        accuracies, diff, identical = [], 0.0, False
        for j, data in enumerate(self.stream[:seen]):
            acc, logits = self.accuracy(strategy.forward(BASE if j == 0 else data.name), data.test)
            accuracies.append(acc)
            if j == 0:
                identical = torch.equal(logits, self.reference)
                diff = float((logits - self.reference).abs().max()) if len(logits) else 0.0
        return Arrival(self.stream[seen - 1].name, accuracies, seconds, stored, diff, identical)


def run_strategy(name: str, context: StreamContext, evaluator: _Evaluator, settings: StreamSettings,
                 train: TrainSettings, out_dir: Path, *, progress: bool) -> StrategyRun:
    """Drive strategy `name` through the whole stream; measure every arrival."""
    cls = STRATEGIES[name]
    try:
        options = cls.settings_class(**dict(settings.strategy_options.get(name) or {}))
    except TypeError as exc:
        raise ConfigError(f"params.yaml stream.strategy_options.{name}: {exc}") from None
    fit_settings = dataclasses.replace(train, epochs=settings.epochs, lr=options.lr or train.lr)
    if settings.min_steps is not None:
        fit_settings = dataclasses.replace(fit_settings, min_steps=settings.min_steps)
    strategy = cls(context, options)
    stream = evaluator.stream
    store = out_dir / "store" / name
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    run = StrategyRun(name, [d.name for d in stream])
    torch.manual_seed(context.seed)
    started = time.perf_counter()
    strategy.start(stream[0])
    run.arrivals.append(evaluator.arrival(strategy, 1, time.perf_counter() - started, store))
    for index, data in enumerate(stream[1:], start=1):
        torch.manual_seed(context.seed + index)  # same head/Δ initialisation stream for every strategy
        started = time.perf_counter()
        trainable = strategy.prepare(data)
        preparing = time.perf_counter() - started
        before, _ = evaluator.accuracy(strategy.forward(data.name), data.test)
        at_init = evaluator.at_init(strategy.head(data.name), data)
        started = time.perf_counter()
        fit(trainable, data, fit_settings, context.norm, seed=context.seed + index, progress=progress,
            desc=f"{name}: {data.name} ({index}/{len(stream) - 1})")
        strategy.after_fit(data)
        arrival = evaluator.arrival(strategy, index + 1, preparing + time.perf_counter() - started, store)
        arrival.before, arrival.at_init = before, at_init
        run.arrivals.append(arrival)
    run.notes = strategy.notes()
    if not settings.keep_files:  # measured on disk; the copies themselves are not needed afterwards
        shutil.rmtree(store, ignore_errors=True)
    return run


# ---------------------------------------------------------------- the whole stream
def run_stream(params: dict[str, Any], strategies: list[str] | None = None, tasks: list[str] | None = None,
               quick: bool = False, out_dir: Path = Path("stream-results"), progress: bool = True,
               epochs: int | None = None, tracking_uri: str | None = None) -> StreamResult:
    """Run every strategy over the stream of task names; write stream.csv/.md/.png; log to MLflow
    when a tracking URI is configured (see deltapatch/stream/tracking.py)."""

    settings = section(params, "stream", StreamSettings).for_run(quick)
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    task_names = list(tasks or settings.tasks or section(params, "bench", BenchSettings).tasks)
    _check_stream(params, task_names)
    with tempfile.TemporaryDirectory(prefix="deltapatch-stream-") as workdir:
        # A bad name or dataset fails here, before any training.
        patch_tasks = [resolve_task(params, t, Path(workdir)) for t in task_names]
    return run_tasks(params, patch_tasks, settings, strategies=strategies, quick=quick, out_dir=out_dir,
                     progress=progress, tracking_uri=tracking_uri)


def run_tasks(params: dict[str, Any], patch_tasks: list[TaskData], settings: StreamSettings, *,
              strategies: list[str] | None = None, quick: bool = False, out_dir: Path = Path("stream-results"),
              progress: bool = True, tracking_uri: str | None = None) -> StreamResult:
    """`run_stream` on task data already loaded (the base task is prepended; caps applied here)."""

    wall = time.perf_counter()
    names = list(strategies or settings.strategies)
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        raise DeltapatchError(f"unknown strategy(ies) {unknown}; available: {sorted(STRATEGIES)}")
    uri = tracking.configured_tracking_uri(params, tracking_uri)
    if uri:
        tracking.check(params, uri)  # fail before the training, not after
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context, train, base_data = open_context(params, settings, progress=progress)
    stream = [base_data, *[capped(data, settings, context.seed) for data in patch_tasks]]
    evaluator = _Evaluator(context, stream)
    pristine = {k: v.clone() for k, v in context.base.model.state_dict().items()}
    result = StreamResult([], [d.name for d in stream], settings, quick, context.base.weights_path.stat().st_size,
                          True, out_dir)
    for name in names:
        result.runs.append(run_strategy(name, context, evaluator, settings, train, out_dir, progress=progress))
        report.write_csv(result, out_dir / "stream.csv")  # partial results survive a crash
    state = context.base.model.state_dict()
    result.pristine_base_unchanged = all(torch.equal(v, state[k]) for k, v in pristine.items())
    result.wall_seconds = time.perf_counter() - wall
    report.write_all(result)
    if uri:
        result.mlflow_run = tracking.log_stream(params, uri, result)
    return result


def _check_stream(params: dict[str, Any], task_names: list[str]) -> None:
    base_task = str(params["base"].get("task", "digits"))
    if not task_names:
        raise DeltapatchError("the stream has no tasks after the base task; pass --tasks or set stream.tasks")
    repeated = sorted({t for t in task_names if task_names.count(t) > 1})
    if repeated:
        raise DeltapatchError(f"task(s) {repeated} appear more than once in the stream; each task arrives once")
    if base_task in task_names or BASE in task_names:
        raise DeltapatchError(f"'{base_task}' is the base task, always first in the stream; leave it out of --tasks")
