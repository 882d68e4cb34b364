"""The benchmark: every method on every task (built-in, ingested, or a user's own dataset), with
the learning rate of each method chosen on validation from one shared grid, over several seeds.

    frame = run_bench(params, quick=True, out_dir=Path("bench-results"))

Writes `bench.csv` (COLUMNS, one row per (method, task, seed)), `bench.md` and `bench.png`.
Semantics of every column: docs/benchmark.md.
"""

from deltapatch.bench.report import TARGETS, accuracy_table, target_checks, time_to_accuracy
from deltapatch.bench.runner import (
    MethodRun,
    TrainedRun,
    open_context,
    paired_latency_ratio,
    run_bench,
    select_by_validation,
)
from deltapatch.bench.settings import COLUMNS, REFERENCE_METHOD, BenchSettings

__all__ = [
    "COLUMNS", "REFERENCE_METHOD", "TARGETS", "BenchSettings", "MethodRun", "TrainedRun", "accuracy_table",
    "open_context", "paired_latency_ratio", "run_bench", "select_by_validation",
    "target_checks", "time_to_accuracy",
]
