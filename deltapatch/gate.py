"""The non-regression gate every new patch passes before it may be promoted.

Three checks, all measured with the *saved* patch loaded from disk next to the currently promoted
patches of the other tasks (one :class:`~deltapatch.delta.DeltaNetwork`, as when serving):

``base``
    Routing to ``base`` gives logits bit-identical (``torch.equal``) to the pristine base model on
    the base evaluation set, and therefore the same accuracy.
``interference``
    Every promoted patch of another task reproduces its registered test accuracy (within
    ``gate.interference_tolerance``) with the new patch loaded beside it. When the task's data
    folder no longer holds the data the champion was registered on, its accuracy measured before
    the new patch was loaded is the reference instead (and the check says so).
``patch_accuracy``
    The new patch reaches ``gate.min_patch_accuracy`` on its test split.

    result = run_gate(params, session, "glyphs", patch_dir, champions)
    if not result.passed:
        raise GateFailed(result.message)   # e.g. "gate failed: patch_accuracy 0.412 < 0.600 (short by 0.188)"
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltapatch.config import ConfigError, section
from deltapatch.data.dataset import TaskData, load_task_dir
from deltapatch.data.ingest import file_sha256
from deltapatch.data.probe import AGREEMENT, PROBE_PREFIX
from deltapatch.data.versioning import tasks_dir
from deltapatch.delta import DeltaNetwork
from deltapatch.delta.patch import load_patch, read_patch_meta
from deltapatch.evaluate import base_check, task_accuracy
from deltapatch.patching import PatchSession, open_session

if TYPE_CHECKING:
    from deltapatch.train import Normalizer

# Slack when comparing accuracies. Registered accuracies are MLflow tags rounded to 4 decimals (±5e-5):
# measured in a base upgrade, a rebased patch with exactly its champion's 88/90 was refused against the
# tag's 0.9778. One image of a test set of up to 16 000 images is still more than this.
ACC_EPSILON = 6e-5


@dataclass
class GateSettings:
    """params.yaml `gate:` section.

    min_patch_accuracy: the new patch's test accuracy must reach this (0..1).
    interference_tolerance: allowed drop of a promoted patch's registered test accuracy (0 = none).
    base_upgrade_tolerance: a new base (``deltapatch base upgrade``) may be this much less accurate on
        the base task than the base in service (0 = at least as accurate).
    rebase_tolerance: a patch rebased onto a new base may be this much less accurate than the champion
        it replaces, on the same data version. Default 0.02: retraining the same recipe on the same
        data moves a small test set's accuracy by an image or two (one image of the demo's 90 is
        0.011; a binomial standard error at 0.95 is 0.023), and 0 would refuse such a rebase on noise.
    """

    min_patch_accuracy: float = 0.5
    interference_tolerance: float = 0.0
    base_upgrade_tolerance: float = 0.0
    rebase_tolerance: float = 0.02


def gate_settings(params: dict[str, Any]) -> GateSettings:
    settings = section(params, "gate", GateSettings)
    if not 0.0 <= float(settings.min_patch_accuracy) <= 1.0:
        raise ConfigError(f"params.yaml: gate.min_patch_accuracy={settings.min_patch_accuracy} must be in [0, 1]")
    for name in ("interference_tolerance", "base_upgrade_tolerance", "rebase_tolerance"):
        if float(getattr(settings, name)) < 0:
            raise ConfigError(f"params.yaml: gate.{name}={getattr(settings, name)} must be ≥ 0")
    return settings


@dataclass
class Champion:
    """A promoted patch of some task, as the registry knows it."""

    task: str
    version: str
    patch_dir: Path
    test_acc: float
    data_version: str = ""


@dataclass
class GateCheck:
    """One check: `value` measured, `threshold` required, `detail` in words (with the numbers)."""

    name: str
    passed: bool
    value: float
    threshold: float
    detail: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GateResult:
    task: str
    checks: list[GateCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> GateCheck | None:
        """The first check called `name` (interference checks are named ``interference:<task>``)."""
        return next((c for c in self.checks if c.name == name), None)

    @property
    def base_bit_identical(self) -> bool:
        base = self.check("base")
        return bool(base and base.extra.get("bit_identical"))

    @property
    def message(self) -> str:
        if self.passed:
            return f"gate passed for '{self.task}': " + "; ".join(c.detail for c in self.checks)
        return f"gate failed for '{self.task}': " + "; ".join(c.detail for c in self.failed)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "passed": self.passed, "message": self.message,
                "checks": [asdict(c) for c in self.checks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(data["task"], [GateCheck(**c) for c in data["checks"]])


def run_gate(params: dict[str, Any], session_or_net: PatchSession | DeltaNetwork | None, new_task: str,
             patch_dir: Path, registered_champions: list[Champion] | dict[str, Champion] | None = None, *,
             test_data: TaskData | None = None) -> GateResult:
    """Load the saved patch at `patch_dir` (as `new_task`) beside the champions and run the checks.

    `session_or_net`: a :class:`~deltapatch.patching.PatchSession` (reuses its pristine reference
    logits), a bare :class:`~deltapatch.delta.DeltaNetwork` (the pristine reference is computed from
    a freshly loaded base) or None (a session is opened). `test_data`: the new task's TaskData
    (default: read from ``data/tasks/<new_task>``). The network is left with the new patch and the
    champions loaded.
    """
    settings = gate_settings(params)
    if session_or_net is None:
        session_or_net = open_session(params)
    if isinstance(session_or_net, PatchSession):
        session = session_or_net
    elif isinstance(session_or_net, DeltaNetwork):
        session = open_session(params, net=session_or_net)  # the pristine reference from a fresh base
    else:
        raise TypeError(f"run_gate needs a PatchSession or DeltaNetwork, got {type(session_or_net).__name__}")
    net, norm = session.net, session.norm
    champions = list(registered_champions.values()) if isinstance(registered_champions, dict) else list(registered_champions or [])
    champions = [c for c in champions if c.task != new_task]  # the task's own champion is being replaced

    # Champions first, alone: their accuracy before the new patch is the fallback reference.
    before: dict[str, tuple[float, tuple[TaskData, bool]]] = {}
    for champ in champions:
        if champ.task in net.tasks:
            net.remove_task(champ.task)
        load_patch(net, Path(champ.patch_dir), task=champ.task)
        data, same_data = _champion_test_data(params, champ)
        if data is not None:
            before[champ.task] = (task_accuracy(net, champ.task, data.test, norm), (data, same_data))

    if new_task in net.tasks:
        net.remove_task(new_task)  # test the saved artifact, not the in-memory training copy
    load_patch(net, Path(patch_dir), task=new_task)

    checks = [_base(net, session)]
    for champ in champions:
        checks.append(_interference(net, norm, champ, before.get(champ.task), settings))
    if test_data is None:
        test_data = _task_data(params, new_task)
    acc = task_accuracy(net, new_task, test_data.test, norm)
    need = float(settings.min_patch_accuracy)
    ok = acc >= need
    detail = (f"patch_accuracy {acc:.3f} ≥ gate.min_patch_accuracy {need:.3f}" if ok else
              f"patch_accuracy {acc:.3f} < gate.min_patch_accuracy {need:.3f} (short by {need - acc:.3f})")
    checks.append(GateCheck("patch_accuracy", ok, acc, need, detail, {"n_test": len(test_data.test)}))
    return GateResult(new_task, checks)


def _base(net: DeltaNetwork, session: PatchSession) -> GateCheck:
    check = base_check(net, session.reference_logits, session.base_data.test, session.norm)
    ok = check.bit_identical and check.acc_change == 0
    where = session.base.settings.eval_set
    if where.startswith(PROBE_PREFIX):  # no labelled base-task data: the probe set, and "accuracy" is agreement
        where = f"{where}, {len(session.base_data.test)} real photos; {AGREEMENT}"
    if ok:
        detail = (f"base route bit-identical to the pristine base on {where} "
                  f"(accuracy {check.base_acc:.4f} unchanged)")
    else:
        detail = (f"base route NOT bit-identical to the pristine base on {where}: max |Δlogit| {check.max_abs_diff:.3g}, "
                  f"base accuracy {check.base_acc:.4f} vs pristine {check.pristine_acc:.4f} "
                  f"(change {check.acc_change:+.4f})")
    return GateCheck("base", ok, check.max_abs_diff, 0.0, detail,
                     {"bit_identical": check.bit_identical, "base_acc": check.base_acc,
                      "pristine_acc": check.pristine_acc, "acc_change": check.acc_change})


def _interference(net: DeltaNetwork, norm: Normalizer, champ: Champion,
                  before: tuple[float, tuple[TaskData, bool]] | None, settings: GateSettings) -> GateCheck:
    name = f"interference:{champ.task}"
    tol = float(settings.interference_tolerance)
    if before is None:
        return GateCheck(name, True, float("nan"), tol,
                         f"promoted '{champ.task}' v{champ.version}: no test data in data/tasks/{champ.task}, not re-measured")
    acc_before, (data, same_data) = before
    acc = task_accuracy(net, champ.task, data.test, norm)
    registered_acc = _registered_accuracy(champ)
    registered = same_data and not math.isnan(registered_acc)
    reference = registered_acc if registered else acc_before
    source = "registered" if registered else "before the new patch (data changed since registration)"
    drop = reference - acc
    ok = drop <= tol + ACC_EPSILON
    verdict = "reproduced" if ok else f"DROPPED by {drop:.3f} > gate.interference_tolerance {tol:.3f}"
    detail = f"promoted '{champ.task}' v{champ.version}: test accuracy {acc:.3f} vs {source} {reference:.3f} ({verdict})"
    return GateCheck(name, ok, acc, reference - tol, detail,
                     {"task": champ.task, "version": champ.version, "reference": reference,
                      "reference_source": source, "drop": drop, "acc_before": acc_before})


def _registered_accuracy(champ: Champion) -> float:
    """The champion's test accuracy at full precision from its patch.json (registry tags round it),
    else the registry's number."""
    try:
        value = read_patch_meta(Path(champ.patch_dir)).metrics.get("patch_acc")
        if value is not None and not math.isnan(float(value)):
            return float(value)
    except Exception:  # a missing/old patch.json: fall back to the registered tag
        pass
    return float(champ.test_acc)


def _task_data(params: dict[str, Any], task: str) -> TaskData:
    return load_task_dir(tasks_dir(params) / task, int(params["base"]["input_size"]), name=task)


def _champion_test_data(params: dict[str, Any], champ: Champion) -> tuple[TaskData | None, bool]:
    """(TaskData or None, whether it is the data the champion was registered on)."""
    folder = tasks_dir(params) / champ.task
    if not (folder / "manifest.csv").is_file():
        return None, False
    sha = file_sha256(folder / "manifest.csv")
    version = str(champ.data_version or "")
    # compact form <commit[:12]>:<md5>:<manifest sha[:12]>, or a full manifest sha
    marker = version.rsplit(":", 1)[-1] if version else ""
    same = bool(marker) and sha.startswith(marker)
    return _task_data(params, champ.task), same
