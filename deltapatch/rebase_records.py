"""What the steps of a base upgrade (deltapatch/rebase.py) hand each other, and its one-table report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from deltapatch.errors import DeltapatchError
from deltapatch.gate import ACC_EPSILON
from deltapatch.registry.bases import SwitchRecord
from deltapatch.step_results import _Record


class RebaseRefused(DeltapatchError):
    """The base gate refused the new base, or some tasks failed their gate (no switch)."""


@dataclass
class BaseGate(_Record):
    new_version: int
    new_acc: float
    current_version: int
    current_acc: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.new_acc >= self.current_acc - self.tolerance - ACC_EPSILON

    @property
    def message(self) -> str:
        verdict = "passed" if self.passed else "REFUSED"
        return (f"base gate {verdict}: new base v{self.new_version} accuracy {self.new_acc:.4f} vs current base "
                f"v{self.current_version} {self.current_acc:.4f} (gate.base_upgrade_tolerance {self.tolerance:g})")


@dataclass
class RebaseJob(_Record):
    """One task to rebase: the champion it replaces and that champion's exact data."""

    task: str
    old_version: int
    old_acc: float | None
    data_version: str
    manifest_sha256: str  # full sha256 of the data version's manifest.csv


@dataclass
class RebaseOutcome(_Record):
    task: str
    old_version: int
    old_acc: float | None
    new_version: str = ""
    new_acc: float | None = None
    passed: bool = False
    detail: str = ""
    reused: bool = False       # registered by an earlier run of the rebase: not trained again
    manifest_sha256: str = ""  # of the data the new patch was trained on
    seconds: float = 0.0        # from submitting the training to the gate's verdict (queueing included)
    train_seconds: float = 0.0  # the training itself (TrainedPatch.wall_seconds); 0 when reused


@dataclass
class RebaseReport(_Record):
    gate: dict[str, Any]
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    switch: dict[str, Any] | None = None
    message: str = ""


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def timing_line(wall_seconds: float, outcomes: list[RebaseOutcome]) -> str:
    """The fan-out's overhead: wall time of the whole rebase against the sum of its trainings."""
    trained = sum(o.train_seconds for o in outcomes)
    if trained <= 0:
        return f"Rebase wall time {wall_seconds:.1f} s (nothing trained)."
    return (f"Rebase wall time {wall_seconds:.1f} s; the {sum(1 for o in outcomes if o.train_seconds > 0)} training(s) "
            f"took {trained:.1f} s in total: {wall_seconds / trained:.2f}× their sum.")


def report_markdown(gate: BaseGate, outcomes: list[RebaseOutcome], switch: SwitchRecord | None, message: str = "") -> str:
    """The rebase's one table (a Prefect artifact; also printed by `deltapatch base upgrade`)."""
    lines = [f"# Base upgrade v{gate.current_version} → v{gate.new_version}", "", gate.message, ""]
    if outcomes:
        lines += ["| task | version | accuracy (test) | gate |", "|---|---|---|---|"]
        for o in outcomes:
            gate_text = ("✅ reused" if o.reused else "✅") if o.passed else f"❌ {o.detail}"
            lines.append(f"| {o.task} | v{o.old_version} → {('v' + o.new_version) if o.new_version else '-'} | "
                         f"{fmt_acc(o.old_acc)} → {fmt_acc(o.new_acc)} | {gate_text} |")
        lines.append("")
    if switch is not None:
        lines.append(f"**Switched** to base v{switch.to_version} at {switch.at} with {len(switch.tasks)} patch(es)"
                     + (f"; unavailable: {', '.join(sorted(switch.unavailable))}" if switch.unavailable else "") + ".")
    if message:
        lines.append(message)
    return "\n".join(lines) + "\n"


__all__ = ["BaseGate", "RebaseJob", "RebaseOutcome", "RebaseRefused", "RebaseReport", "fmt_acc", "report_markdown", "timing_line"]
