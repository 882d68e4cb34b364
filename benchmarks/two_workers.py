"""Two workers vs one (issue 15): the same two arrivals, trained on one worker (pool concurrency 1:
one after the other) and on two workers — the stack's and a simulated second machine started with
`deltapatch worker start` from its own clone (pool concurrency 2, one run per worker). Wall time from
the first submission until both arrivals are promoted; writes two-workers.md / .json into OUT.

    python benchmarks/two_workers.py OUT [--epochs 10] [--per-class 60] [--base-from PROJECT]

Every training gets one thread (train.threads: 1; on 2 cores, two trainings at once get one core
each). The second machine shares nothing with the stack's except the servers' addresses and the
"remote" stores in a shared folder (DVC remote, result storage), as in tests/flows/test_second_machine_e2e.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from deltapatch import prefect_api, stack
from deltapatch.config import find_project_root, load_params
from deltapatch.data.builtin import write_imagefolder
from deltapatch.demo import prepare_project, run_results, wait_for_runs
from deltapatch.inbox import submit

TASKS = ("glyphs", "digits-inverted")  # the same size (10 classes): the parallel wall is the longer training
SECOND = "second-machine"
CLI = [sys.executable, "-c", "from deltapatch.cli import app; app()"]
FOREIGN = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "DELTAPATCH_PROJECT", "DELTAPATCH_WORKER_PROJECT",
           "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(folder: Path, src: dict[str, Any], shared: Path, workers: int, epochs: int) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((Path(src["_root"]) / "params.yaml").read_text())
    raw.setdefault("stack", {}).update({
        "prefect_port": _free_port(), "mlflow_port": _free_port(), "serve_app": False, "watch_stable_seconds": 1.0,
        "startup_timeout": 300, "pool_concurrency": workers, "worker_limit": 1,
        "result_storage": str(shared / "results")})
    raw.setdefault("data", {})["dvc_remote"] = str(shared / "dvc-remote")
    raw.setdefault("train", {}).update({"epochs": epochs, "min_steps": 0, "threads": 1})
    raw.setdefault("gate", {})["min_patch_accuracy"] = 0.0
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return prepare_project(src, folder, print)


def _clone(params: dict[str, Any], dest: Path) -> Path:
    root = Path(params["_root"])
    subprocess.run(["git", "clone", "-q", str(root), str(dest)], check=True)
    if not (dest / "params.yaml").is_file():
        shutil.copy(root / "params.yaml", dest / "params.yaml")
    shutil.copytree(root / "models", dest / "models")
    return dest


def _wait_online(api: str, pool: str, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5).json()
        if any(w["name"] == name and w.get("status") == "ONLINE" for w in found):
            return
        time.sleep(1)
    raise RuntimeError(f"worker {name} did not come online")


def run_once(scratch: Path, src: dict[str, Any], sources: list[Path], workers: int, epochs: int) -> dict[str, Any]:
    shared = scratch / "shared"
    params = _project(scratch / "machine-a" / "project", src, shared, workers, epochs)
    second = None
    try:
        stack.up(params, on_progress=lambda m: print(f"  {m}", flush=True))
        urls = stack.urls(params)
        api = urls["prefect_api_url"]
        if workers == 2:
            clone = _clone(params, scratch / "machine-b" / "project")
            env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
            with (scratch / "second-worker.log").open("ab") as log:
                second = subprocess.Popen([*CLI, "worker", "start", "--project", str(clone), "--prefect-api", api,
                                           "--mlflow", urls["mlflow_url"], "--name", SECOND, "--limit", "1"],
                                          cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
            _wait_online(api, stack.stack_settings(params).gpu_pool, SECOND)
        started = time.monotonic()
        paths = [submit(params, src_dir, task)["path"] for src_dir, task in zip(sources, TASKS, strict=True)]
        runs = wait_for_runs(api, paths, timeout=3600, say=lambda _m: None)
        wall = time.monotonic() - started
        results = run_results(api, runs)
        training = [r for r in prefect_api.flow_runs(api, prefect_api.deployment_id(api, "train-patch/gpu"))
                    if r["state_type"] == "COMPLETED"]
    finally:
        if second is not None and second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(30)
        stack.down(params)
    return {"workers": workers, "wall_s": round(wall, 1), "statuses": {r["task"]: r.get("status") for r in results},
            "trainings": [{"name": r["name"], "worker": (r.get("labels") or {}).get("prefect.worker.name"),
                           "seconds": r.get("total_run_time"), "start": r["start_time"], "end": r["end_time"]}
                          for r in training]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--base-from", type=Path, default=None)
    args = parser.parse_args(argv)
    src = load_params(args.base_from.resolve() if args.base_from else find_project_root())
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for workers in (1, 2):
        scratch = Path(tempfile.mkdtemp(prefix=f"deltapatch-workers{workers}-"))
        try:
            sources = [write_imagefolder(t, scratch / "src", int(src["base"]["input_size"]), 0, args.per_class)
                       for t in TASKS]
            rows.append(run_once(scratch, src, sources, workers, args.epochs))
            print(json.dumps(rows[-1], indent=2), flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    lines = ["| workers | wall s (2 arrivals → both promoted) | trainings (worker: s) | statuses |", "|---|---|---|---|"]
    for row in rows:
        spans = ", ".join(f"{t['worker']}: {t['seconds']:.0f}" for t in row["trainings"])
        lines.append(f"| {row['workers']} | {row['wall_s']:.0f} | {spans} | {row['statuses']} |")
    lines.append(f"\ntwo workers / one worker = {ratio:.2f} (target ≤ 0.6); train.threads 1, {args.epochs} epochs, "
                 f"{args.per_class} images per class\n")
    table = "\n".join(lines)
    print(table)
    (args.out / "two-workers.md").write_text(table + "\n")
    (args.out / "two-workers.json").write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
