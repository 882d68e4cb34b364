"""params.yaml `bench:` section and the columns of bench.csv."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltapatch.config import ConfigError, with_quick

# bench.csv: these columns, in this order (docs/benchmark.md says what each one means). The first
# fourteen are the original table; later columns are only ever appended.
COLUMNS = [
    "method", "task", "patch_acc", "base_acc", "base_acc_change", "base_logits_max_abs_diff",
    "trainable_params", "trainable_pct", "patch_bytes", "patch_pct", "train_s_per_epoch",
    "train_time_ratio_vs_full_ft", "latency_ratio_merged", "latency_ratio_unmerged",
    "seed", "lr", "val_acc", "epochs_run", "train_seconds", "time_to_full_ft_val_ratio",
    "step_time_ratio_paired", "shots", "shift_blur_acc", "shift_contrast_acc", "shift_invert_acc",
]
SHIFT_COLUMNS = {"blur": "shift_blur_acc", "contrast": "shift_contrast_acc", "invert": "shift_invert_acc"}
REFERENCE_METHOD = "full-ft"


@dataclass
class BenchSettings:
    """params.yaml `bench:` section. `quick` holds overrides of these fields for `--quick`."""

    methods: list[str] = field(default_factory=lambda: ["delta-channel", "delta-lowrank", "full-ft",
                                                        "linear-probe", "bn-patch", "paint", "peft-lora"])
    tasks: list[str] = field(default_factory=lambda: ["digits-inverted", "digits-rot90", "digits-parity",
                                                      "glyphs", "shapes"])
    epochs: int = 6
    min_steps: int | None = None  # None: train.min_steps (the step budget of the shared recipe)
    seeds: int = 1  # runs per (method, task): seeds seed, seed+1, …
    # Every method's learning rate is chosen from this one grid on the VALIDATION split (first seed).
    lr_grid: list[float] = field(default_factory=lambda: [0.0003, 0.001, 0.003, 0.01])
    max_train_per_class: int | None = None  # cap on training images per class (None: all)
    max_eval_per_class: int | None = None  # cap on val/test images per class, base task too (None: all)
    images_per_class: int | None = None  # built-in tasks: images generated per class (None: demo.images_per_class)
    # Few-shot runs: K training images per class (stratified, per seed; val/test untouched), each K
    # a task of its own in the table ("fashion-mnist-5shot"); 0 = the whole training split. []: no shots.
    shots: list[int] = field(default_factory=list)
    # Zero-shot domain shift: each patch's accuracy on shifted copies of its test set (data/shifts.py).
    shifts: list[str] = field(default_factory=lambda: ["blur", "contrast", "invert"])
    keep_files: bool = False  # keep OUT/patches/<method>/<task>/ (full-ft/paint: a 45 MB model each)
    latency_batch: int = 64
    latency_repeats: int = 5
    latency_warmup: int = 2
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {paint: {alphas: [...]}}
    quick: dict[str, Any] = field(default_factory=dict)

    def for_run(self, quick: bool) -> BenchSettings:
        """These settings with the `quick` overrides applied when asked for."""
        return with_quick(self, "bench", "method_options") if quick else self

    def shot_list(self) -> list[int | None]:
        """The K of each run (None: no shots asked, the training split as is, task named as before)."""
        bad = [k for k in self.shots if not isinstance(k, int) or k < 0]
        if bad:
            raise ConfigError(f"bench.shots (--shots) must be images per class ≥ 1, or 0/full for the whole "
                              f"training split; got {bad}")
        return list(dict.fromkeys(self.shots)) or [None]

    def seed_list(self, first: int) -> list[int]:
        if self.seeds < 1:
            raise ConfigError(f"bench.seeds (--seeds) must be ≥ 1, got {self.seeds}")
        return [first + i for i in range(self.seeds)]
