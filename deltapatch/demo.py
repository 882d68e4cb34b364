"""`deltapatch demo` (what `make demo` runs): the whole system on the embedded tasks, in a scratch project.

1. create the scratch project (default ``.demo/``): params.yaml copied from the current project with
   the ``demo:`` overrides applied, a git + DVC repository of its own (the developer's repository is
   never committed to);
2. the base model: copied from the current project when it has one for the same base settings,
   else pre-trained;
3. ``stack up`` (Prefect + MLflow servers, gpu worker, served flows, inbox watcher);
4. submit each embedded patch task (ImageFolders) into the inbox: each emits
   ``deltapatch.task.arrived`` and the trigger starts a `patch-task` run; training runs queue
   through the gpu pool (one at a time per GPU);
5. wait for the runs and print the results table and the UI URLs.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from deltapatch import prefect_api, stack
from deltapatch.config import load_params, project_root, state_dir
from deltapatch.data import builtin
from deltapatch.data.versioning import ensure_project_repo
from deltapatch.errors import DeltapatchError
from deltapatch.inbox import PATCH_TASK_DEPLOYMENT, submit
from deltapatch.models.base import base_weights_path, sidecar_path
from deltapatch.models.pretrain import ensure_base

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# demo: keys that are not overrides of other sections
DEMO_KEYS = {"tasks", "images_per_class", "epochs", "min_steps", "keep_base"}


def prepare_project(src_params: dict[str, Any], folder: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Create (or reuse) the scratch project; returns its params."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    params_file = folder / "params.yaml"
    if not params_file.exists():
        raw = yaml.safe_load((project_root(src_params) / "params.yaml").read_text())
        demo = raw.get("demo") or {}
        for key in ("epochs", "min_steps"):  # the demo's own, smaller training budget
            if demo.get(key) is not None:
                raw.setdefault("train", {})[key] = int(demo[key])
        params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        say(f"created scratch project {folder}")
    params = load_params(folder)
    ensure_project_repo(folder, params)
    _base_weights(src_params, params, say)
    return params


def _base_weights(src: dict[str, Any], params: dict[str, Any], say: Callable[[str], None]) -> None:
    target = base_weights_path(params)
    if target.exists():
        return
    source = base_weights_path(src)
    same_base = {k: v for k, v in src["base"].items() if k != "weights"} == {
        k: v for k, v in params["base"].items() if k != "weights"}
    if source.exists() and same_base and source.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        if sidecar_path(source).exists():
            shutil.copy2(sidecar_path(source), sidecar_path(target))
        say(f"base model copied from {source}")
        return
    started = time.perf_counter()
    ensure_base(params, progress=True, say=say)
    say(f"base model pre-trained in {time.perf_counter() - started:.0f} s")


def use_stack(params: dict[str, Any]) -> dict[str, str]:
    """Point this process's Prefect/MLflow clients at the project's stack (before importing prefect)."""
    env = stack.client_env(params)
    if env is None:
        raise DeltapatchError("the stack is not running")
    os.environ.update(env)
    return env


def wait_for_runs(api_url: str, paths: list[str], timeout: float, say: Callable[[str], None],
                  deployment: str = PATCH_TASK_DEPLOYMENT) -> dict[str, dict[str, Any]]:
    """Poll the Prefect API until the run of `deployment` for each submitted path is terminal."""
    deadline = time.monotonic() + timeout
    dep = prefect_api.deployment_id(api_url, deployment)
    runs: dict[str, dict[str, Any]] = {}
    reported: dict[str, str] = {}
    while True:
        found = prefect_api.runs_by_path(api_url, dep)
        runs.update({p: found[p] for p in paths if p in found})
        for path, run in runs.items():
            state = (run.get("state") or {}).get("type", "?")
            if reported.get(path) != state:
                reported[path] = state
                say(f"  {run['name']}: {state.lower()}")
        done = [p for p in paths if (runs.get(p, {}).get("state") or {}).get("type") in TERMINAL]
        if len(done) == len(paths):
            return runs
        if time.monotonic() > deadline:
            missing = [Path(p).name for p in paths if p not in done]
            raise DeltapatchError(f"timed out after {timeout:.0f} s waiting for the runs of {missing}; "
                                  "see the Prefect UI and .deltapatch/stack/logs/")
        time.sleep(2.0)


def run_results(api_url: str, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the flow's result for completed runs, the failure message otherwise."""
    # Prefect reads its settings from the environment when first imported: use_stack sets them first.
    from prefect.client.orchestration import get_client  # lazy: prefect reads env at import
    from prefect.settings import PREFECT_API_URL, temporary_settings  # lazy: prefect reads env at import

    rows = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for path, run in runs.items():
            flow_run = client.read_flow_run(run["id"])
            seconds = flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None
            if flow_run.state and flow_run.state.is_completed():
                row = dict(flow_run.state.result())
                row["seconds"] = seconds or row.get("seconds")
            else:
                row = {"task": (run.get("parameters") or {}).get("task_name") or Path(path).name,
                       "status": flow_run.state.name if flow_run.state else "?",
                       "message": flow_run.state.message if flow_run.state else "", "seconds": seconds}
            rows.append(row)
    return rows


def run_demo(src_params: dict[str, Any], project: Path, *, tasks: list[str] | None = None, down_after: bool = False,
             timeout: float = 1800.0, say: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    params = prepare_project(src_params, project, say)
    say("starting the stack (a running one only gets its stopped processes restarted)…")
    stack.up(params, on_progress=lambda m: say(f"  {m}"))
    env = use_stack(params)
    demo = copy.deepcopy(params.get("demo") or {})
    names = list(tasks or demo.get("tasks") or builtin.PATCH_TASKS)
    size, seed = int(params["base"]["input_size"]), int(params.get("seed", 0))
    source = state_dir(params) / "demo-src" / time.strftime("%Y%m%dT%H%M%S")
    paths = []
    for name in names:
        folder = builtin.write_imagefolder(name, source, size, seed, int(demo.get("images_per_class", 60)))
        info = submit(params, folder, name)
        paths.append(info["path"])
        say(f"submitted {name} → inbox (event {info['event_id'][:8]}…)")
    say(f"waiting for {len(paths)} patch-task run(s) (training queues through the gpu pool)…")
    runs = wait_for_runs(env["PREFECT_API_URL"], paths, timeout, say)
    results = run_results(env["PREFECT_API_URL"], {p: runs[p] for p in paths})
    urls = (stack.read_state(params) or {}).get("urls", {})
    if down_after:
        stack.down(params, on_progress=lambda m: say(f"  {m}"))
    return {"results": results, "seconds": time.perf_counter() - started, "urls": urls,
            "project": str(project_root(params))}
