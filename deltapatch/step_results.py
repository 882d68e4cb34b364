"""What the pipeline's steps hand each other (deltapatch/pipeline.py): small typed records.

Inside a process the steps pass these objects. A Prefect task returns ``as_dict()`` (JSON-able: the
training step may run on another machine and come back through result storage) and the flow turns
it back with ``from_dict`` — the only place the dict form exists (flows/patch_task.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self


class _Record:
    """as_dict / from_dict for a dataclass of JSON-able fields (unknown keys are an error)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


@dataclass
class Ingested(_Record):
    """A dataset validated, normalised and committed as a data version (ingest_step)."""

    task: str
    status: str  # added | updated | unchanged
    task_dir: str
    manifest_sha256: str
    data_version: str  # compact form; '' when versioning is off
    data_version_info: dict[str, Any] | None = None
    n_images: dict[str, int] = field(default_factory=dict)  # per split
    classes: list[str] = field(default_factory=list)
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class Versioned(_Record):
    """The data version is on the DVC remote (version_step)."""

    pushed: bool
    note: str
    data_version: str


@dataclass
class TrainedPatch(_Record):
    """A trained Δ-patch with its metrics, and its files so that it can travel back from a GPU worker
    on another machine (train_step; pipeline.materialise_patch writes them out again)."""

    task: str
    patch_dir: str
    metrics: dict[str, float]
    base_check: dict[str, Any]  # bit_identical, max_abs_diff, base_acc, pristine_acc
    resumed_from_epoch: int
    checkpoint: str
    training_key: str
    epochs_run: int
    history: list[dict[str, Any]]  # EpochRecord fields, per epoch
    device: str
    data_version: str
    wall_seconds: float
    files: dict[str, str]  # file name → base64 content
    flow_run_id: str = ""  # set by the Prefect training task: which run trained it
    attempt: int = 1
    attempts: list[dict[str, Any]] = field(default_factory=list)  # pool.TrainingAttempt, when trained on the pool

    @property
    def patch_acc(self) -> float:
        return float(self.metrics["patch_acc"])


@dataclass
class Registered(_Record):
    """A registered MLflow model version of the patch (register_step)."""

    task: str
    version: str
    run_id: str
    gate_passed: bool
    mlflow_url: str = ""
