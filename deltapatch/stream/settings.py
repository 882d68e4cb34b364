"""params.yaml `stream:` — the continual-learning stream's settings (docs/benchmark.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltapatch.config import with_quick


@dataclass
class StreamSettings:
    """params.yaml `stream:` section. `quick` holds overrides of these fields for `--quick`."""

    strategies: list[str] = field(default_factory=lambda: ["delta", "naive", "ewc", "lwf", "replay", "lora", "paint"])
    tasks: list[str] | None = None  # the tasks after the base task; None: bench.tasks
    epochs: int = 6
    min_steps: int | None = None  # None: train.min_steps (the shared step budget)
    max_train_per_class: int | None = None  # cap on training images per class (None: all)
    max_eval_per_class: int | None = None  # cap on val/test images per class, base task too (None: all)
    keep_files: bool = False  # keep OUT/store/<strategy>/ (what each strategy stores) after measuring it
    experiment: str = "deltapatch-stream"  # MLflow experiment of the stream runs
    strategy_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {ewc: {ewc_lambda: 1000}}
    quick: dict[str, Any] = field(default_factory=dict)

    def for_run(self, quick: bool) -> StreamSettings:
        """These settings with the `quick` overrides applied when asked for (options merged per strategy)."""
        return with_quick(self, "stream", "strategy_options") if quick else self
