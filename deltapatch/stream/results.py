"""What a stream run produces: one row of the accuracy matrix per arrival, per strategy, and the
whole result. Its own module so that the runner, the report and the tracking all read the same
types without importing one another."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deltapatch.stream.metrics import AccuracyMatrix, average_accuracy, backward_transfer, forward_transfer
from deltapatch.stream.settings import StreamSettings


@dataclass
class Arrival:
    """The state of one strategy after learning one more task: a row of the accuracy matrix."""

    task: str
    accuracies: list[float]  # on tasks 0..i of the stream, in order
    seconds: float  # training time of this arrival (fit + the strategy's own work), evaluation excluded
    stored_bytes: int  # files on disk to serve every task so far
    base_logits_max_abs_diff: float  # base-task test logits vs the pristine base model
    base_bit_identical: bool
    before: float | None = None  # accuracy on this task just before training on it (R[i-1][i])
    at_init: float | None = None  # the same head at initialisation on the pristine base features


@dataclass
class StrategyRun:
    strategy: str
    tasks: list[str]  # the stream, base task first
    arrivals: list[Arrival] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def matrix(self) -> AccuracyMatrix:
        return AccuracyMatrix(self.tasks, [a.accuracies for a in self.arrivals])

    @property
    def acc(self) -> float:
        return average_accuracy(self.matrix)

    @property
    def bwt(self) -> float:
        return backward_transfer(self.matrix)

    @property
    def fwt(self) -> float:
        later = [a for a in self.arrivals[1:] if a.before is not None and a.at_init is not None]
        return forward_transfer([a.before for a in later], [a.at_init for a in later])  # type: ignore[misc]

    @property
    def train_seconds(self) -> float:
        return sum(a.seconds for a in self.arrivals)


@dataclass
class StreamResult:
    runs: list[StrategyRun]
    tasks: list[str]
    settings: StreamSettings
    quick: bool
    base_bytes: int  # size of the base weights file: the reference for storage growth
    pristine_base_unchanged: bool
    out_dir: Path
    wall_seconds: float = 0.0
    mlflow_run: str | None = None  # "<tracking uri> run <id>" when logged

    def run(self, strategy: str) -> StrategyRun | None:
        return next((r for r in self.runs if r.strategy == strategy), None)
