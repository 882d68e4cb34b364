"""`deltapatch doctor`: check the project and name the fix for what is wrong.

One row per concern: params.yaml valid, the base model (fingerprint, accuracy), the DVC remote, the
stack's processes, the registry store (with its patch count), the Prefect deployments and work-pool
workers, CUDA. A row is ``ok``, ``FAIL`` (with the fix) or ``-`` (not in use, e.g. the stack is down).
Each check catches its own errors, so one broken piece never hides the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from deltapatch import stack
from deltapatch.access import prefect_headers
from deltapatch.automations import zombie_automation_state
from deltapatch.bench import BenchSettings
from deltapatch.config import STATE_DIR, ConfigError, load_params, section, state_dir
from deltapatch.data.probe import AGREEMENT, PROBE_PREFIX
from deltapatch.data.sources import base_eval_data
from deltapatch.data.versioning import check_remote, data_settings
from deltapatch.errors import DeltapatchError
from deltapatch.faults import fault_settings
from deltapatch.gate import gate_settings
from deltapatch.models.base import base_settings, base_weights_path, load_base, sidecar_path
from deltapatch.models.pretrain import PretrainSettings, is_embedded_base
from deltapatch.patching import DeltaSettings
from deltapatch.registry import store, tracking
from deltapatch.registry.registry import list_patches
from deltapatch.stack.auth import use_credentials
from deltapatch.train import Normalizer, TrainSettings, accuracy, predict_logits, resolve_device

OK, FAIL, NOT_USED = "ok", "FAIL", "-"


@dataclass
class Check:
    name: str
    status: str  # OK | FAIL | NOT_USED
    detail: str
    fix: str = ""


# params.yaml section → the function that builds (and validates) its settings
SECTIONS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "base": base_settings,
    "pretrain": lambda p: section(p, "pretrain", PretrainSettings),
    "delta": lambda p: section(p, "delta", DeltaSettings),
    "train": lambda p: section(p, "train", TrainSettings),
    "data": data_settings,
    "gate": gate_settings,
    "stack": stack.stack_settings,
    "bench": lambda p: section(p, "bench", BenchSettings),
    "registry": tracking.registry_settings,
    "faults": fault_settings,
}


def check_params(params: dict[str, Any]) -> Check:
    problems = []
    for build in SECTIONS.values():
        try:
            build(params)
        except (ConfigError, TypeError, ValueError) as exc:
            problems.append(str(exc).splitlines()[0])
    if problems:
        return Check("params", FAIL, "; ".join(problems), "edit params.yaml as the message says")
    return Check("params", OK, f"{len(SECTIONS)} sections valid")


def check_base(params: dict[str, Any]) -> Check:
    settings = base_settings(params)
    weights = base_weights_path(params)
    if not weights.is_file():
        fix = ("`deltapatch pretrain` (any command that needs the base also pre-trains it)" if is_embedded_base(params)
               else f"put your base weights at {weights}, or point base.weights in params.yaml at them")
        return Check("base", FAIL, f"{weights} missing", fix)
    try:
        base = load_base(params)
    except DeltapatchError as exc:
        return Check("base", FAIL, str(exc).splitlines()[0], "fix base.arch/base.weights in params.yaml")
    shape = (f"{base.total_params / 1e6:.2f} M parameters, {len(base.class_names)} classes, input {settings.input_size} px "
             f"mean {settings.mean} std {settings.std}")
    return Check("base", OK, f"{settings.arch} {base.fingerprint.removeprefix('sha256:')[:12]}, {shape}, "
                             f"{_base_accuracy(params, base)}")


def _base_accuracy(params: dict[str, Any], base: Any) -> str:
    sidecar = sidecar_path(base.weights_path)
    if sidecar.is_file():
        acc = json.loads(sidecar.read_text()).get("metrics", {}).get("test_acc")
        if acc is not None:
            return f"test acc {float(acc):.3f} (pre-training)"
    data = base_eval_data(params, base)
    norm = Normalizer(base.settings.mean, base.settings.std, torch.device("cpu"))
    acc = accuracy(predict_logits(base.model, data.test, norm), data.test.labels)
    if base.settings.eval_set.startswith(PROBE_PREFIX):
        return (f"test acc {acc:.3f} on {base.settings.eval_set} ({len(data.test)} images; {AGREEMENT}; the gate checks "
                f"bit-identity there)")
    return f"test acc {acc:.3f} ({base.settings.eval_set})"


def check_dvc(params: dict[str, Any]) -> Check:
    try:
        label, problem = check_remote(params)
    except DeltapatchError as exc:
        label, problem = "", str(exc)
    if problem:
        return Check("dvc remote", FAIL, f"{label}: {problem}" if label else problem,
                     "make the remote reachable, or set another with `dvc remote add -d NAME URL`")
    if not label:
        return Check("dvc remote", NOT_USED, "no DVC repository yet (set up by the first ingest)")
    return Check("dvc remote", OK, f"{label} reachable")


def check_stack(params: dict[str, Any]) -> Check:
    info = stack.status(params)
    procs = info["processes"]
    if not info["running"]:
        return Check("stack", NOT_USED, "not running (commands open the registry store directly)")
    bad = [f"{name} {'unhealthy' if p['running'] else 'down'}" for name, p in procs.items() if not p["healthy"]]
    if bad:
        return Check("stack", FAIL, ", ".join(bad), "`deltapatch stack up` restarts the processes that are down "
                                                   "(see .deltapatch/stack/logs/)")
    return Check("stack", OK, f"{len(procs)} processes healthy")


def check_registry(params: dict[str, Any]) -> Check:
    uri = tracking.resolve_tracking_uri(params)
    local = f"{STATE_DIR}/{store.SQLITE_DB}"
    where = local if store.sqlite_path(uri) else uri + (f" (serving {local})" if tracking.uses_project_store(params) else "")
    if tracking.uses_project_store(params):
        problem = store.legacy_problem(state_dir(params))
        if problem:
            return Check("registry", FAIL, problem.split(";")[0], "`deltapatch registry migrate`")
    db = store.sqlite_path(uri)
    if db is not None and not db.is_file():
        return Check("registry", NOT_USED, f"{where}: not created yet (the first registration creates it)")
    try:
        rows = list_patches(params)
    except DeltapatchError as exc:
        return Check("registry", FAIL, f"{where}: {str(exc).splitlines()[0]}",
                     exc.hint or "start the stack (`deltapatch stack up`) or fix MLFLOW_TRACKING_URI")
    champions = sum(1 for r in rows if r["aliases"])
    tasks = len({r["task"] for r in rows})
    return Check("registry", OK, f"{where}: {len(rows)} patch version(s) of {tasks} task(s), {champions} champion(s)")


def check_prefect(params: dict[str, Any]) -> Check:
    env = stack.client_env(params)
    api = (env or {}).get("PREFECT_API_URL") or os.environ.get("PREFECT_API_URL", "")
    if not api:
        return Check("prefect", NOT_USED, "no server (the stack serves the deployments)")
    pool = stack.stack_settings(params).gpu_pool
    use_credentials(params)  # the checks log in where the stack has credentials
    try:
        found = [d for d in stack.DEPLOYMENTS if httpx.get(f"{api}/deployments/name/{d}", timeout=5,
                                                                 headers=prefect_headers()).status_code == 200]
        response = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5, headers=prefect_headers())
        workers = response.json() if response.status_code == 200 else []
    except httpx.HTTPError as exc:
        return Check("prefect", FAIL, f"{api} unreachable ({exc})", "`deltapatch stack up`, or fix PREFECT_API_URL")
    online = [w["name"] for w in workers if w.get("status") == "ONLINE"]
    guarded, guard = zombie_automation_state(api, fault_settings(params))
    detail = (f"{len(found)}/{len(stack.DEPLOYMENTS)} deployments, pool '{pool}': {len(online)} worker(s) online; "
              f"zombie automation: {guard}")
    if len(found) < len(stack.DEPLOYMENTS) or not online or not guarded:
        return Check("prefect", FAIL, detail, "`deltapatch stack up` (serves the flows, starts a worker, repairs "
                                              "the zombie automation)")
    return Check("prefect", OK, detail)


def check_cuda(params: dict[str, Any]) -> Check:
    wanted = section(params, "train", TrainSettings).device
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("cuda", OK, f"{torch.cuda.device_count()} device(s): {names}; train.device {wanted}")
    if str(wanted).startswith("cuda"):
        return Check("cuda", FAIL, f"train.device is {wanted} but no CUDA device is visible",
                     "set train.device: auto (CUDA when present, else the CPU) in params.yaml")
    return Check("cuda", NOT_USED, f"no CUDA device: training runs on the CPU ({resolve_device(wanted)})")


CHECKS: tuple[Callable[[dict[str, Any]], Check], ...] = (
    check_params, check_base, check_dvc, check_stack, check_registry, check_prefect, check_cuda)


def run_checks(params: dict[str, Any] | None = None) -> list[Check]:
    """Every check; a project whose params.yaml cannot even be read gets that one failing row."""
    if params is None:
        try:
            params = load_params()
        except ConfigError as exc:
            return [Check("params", FAIL, str(exc), "run deltapatch in a project folder, or fix params.yaml")]
    out = []
    for check in CHECKS:
        try:
            out.append(check(params))
        except Exception as exc:  # noqa: BLE001 — a failing check is a finding, not a crash
            name = check.__name__.removeprefix("check_")
            out.append(Check(name, FAIL, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             "run `deltapatch --verbose doctor` for details"))
    return out
