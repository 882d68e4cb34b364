"""Issue 15: a second machine, simulated, and two workers on one pool.

The second machine shares nothing with the stack's except network addresses (the Prefect API, the
MLflow server) and remote stores (the project's git repository and DVC remote, the result storage
folder standing in for S3): its own clone of the project in another folder, its own PREFECT_HOME,
its own process tree, started with `deltapatch worker start` — the command a GPU machine runs.

Two arrivals at once, pool concurrency 2, one run per worker (stack.worker_limit 1, `--limit 1`):
both train at the same time, one on each worker, both are promoted, and each training run carries
its worker's name. The clone had no data of the task it trained (it exported the data version from
the DVC remote), the registered runs record no path of either machine, and `predict` on the stack's
machine uses the patch the other machine trained.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.flows.conftest import new_project, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]

SECOND = "second-machine"
CLI = [sys.executable, "-c", "from deltapatch.cli import app; app()"]
# Only the project's own settings reach the second machine: nothing of this process's Prefect/MLflow.
FOREIGN = ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "DELTAPATCH_PROJECT",
           "DELTAPATCH_WORKER_PROJECT", "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK")


def two_machine_project(base_project: dict[str, Any], tmp_path: Path, **stack: Any) -> tuple[dict[str, Any], Path]:
    """The stack machine's project (results and DVC remote in a shared folder) and the second machine's
    clone of it (git clone + the base weights, nothing else)."""
    shared = tmp_path / "shared"  # stands in for S3/GCS: both machines reach it, neither owns it
    params = new_project(base_project, tmp_path / "machine-a" / "project", {
        "stack": {"prefect_port": free_port(), "mlflow_port": free_port(), "serve_app": False,
                  "watch_stable_seconds": 1.0, "startup_timeout": 300, "pool_concurrency": 2, "worker_limit": 1,
                  "result_storage": str(shared / "results"), **stack},
        "data": {"dvc_remote": str(shared / "dvc-remote")},
        # 2 cores: one thread per training; enough epochs that the two trainings overlap although the two
        # arrivals are ingested one after the other (~10 s apart: one git/DVC commit at a time)
        "train": {"epochs": 10, "threads": 1},
    })
    root = Path(params["_root"])
    clone = tmp_path / "machine-b" / "project"
    clone.parent.mkdir(parents=True)
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    if not (clone / "params.yaml").is_file():  # not committed by the project set-up
        shutil.copy(root / "params.yaml", clone / "params.yaml")
    shutil.copytree(root / "models", clone / "models")  # the same base (patches are tied to its fingerprint)
    return params, clone


def start_second_worker(clone: Path, api: str, mlflow_url: str, log: Path, name: str = SECOND) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    with log.open("ab") as out:
        return subprocess.Popen([*CLI, "worker", "start", "--project", str(clone), "--prefect-api", api,
                                 "--mlflow", mlflow_url, "--name", name, "--limit", "1"],
                                cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_online(api: str, pool: str, name: str, worker: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5).json()
        if any(w["name"] == name and w.get("status") == "ONLINE" for w in found):
            return
        if worker.poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"worker {name} did not come online:\n{log.read_text()[-3000:]}")


def stop(worker: subprocess.Popen[bytes] | None) -> None:
    if worker is not None and worker.poll() is None:
        os.killpg(worker.pid, 9)
        worker.wait(30)


def test_second_machine_trains_and_two_workers_share_the_pool(base_project: dict[str, Any], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from deltapatch import prefect_api, stack
    from deltapatch.demo import run_results, wait_for_runs
    from deltapatch.inbox import submit
    from deltapatch.registry import registry

    params, clone = two_machine_project(base_project, tmp_path)
    root = Path(params["_root"])
    tasks = ("shapes", "glyphs")
    assert not any((clone / "data" / "tasks" / t).exists() for t in tasks), "the clone has no task data"
    worker = None
    log = tmp_path / "second-worker.log"
    try:
        stack.up(params)
        urls = stack.urls(params)
        api = urls["prefect_api_url"]
        worker = start_second_worker(clone, api, urls["mlflow_url"], log)
        wait_online(api, stack.stack_settings(params).gpu_pool, SECOND, worker, log)

        started = time.monotonic()
        arrivals = [submit(params, write_task(tmp_path / "src", t, per_class=30), t) for t in tasks]
        runs = wait_for_runs(api, [a["path"] for a in arrivals], timeout=600, say=lambda _m: None)
        wall = time.monotonic() - started
        results = {r["task"]: r for r in run_results(api, runs)}
        training = [r for r in prefect_api.flow_runs(api, prefect_api.deployment_id(api, "train-patch/gpu"))
                    if r["state_type"] == "COMPLETED"]

        assert {t: results[t].get("status") for t in tasks} == dict.fromkeys(tasks, "promoted"), results
        by_worker = {r["labels"].get("prefect.worker.name"): r for r in training}
        assert len(training) == 2 and SECOND in by_worker and len(by_worker) == 2, \
            [(r["name"], r["labels"]) for r in training]
        spans = sorted((r["start_time"], r["end_time"]) for r in training)
        assert spans[0][1] > spans[1][0], f"the two trainings ran one after the other: {spans}"
        remote_task = by_worker[SECOND]["parameters"]["task_name"]

        # The clone got the data version from the DVC remote (an export), its working copy untouched.
        assert list((clone / ".deltapatch" / "exports").glob(f"{remote_task}-*/manifest.csv")), \
            f"no export of {remote_task} in the clone:\n{log.read_text()[-3000:]}"
        assert not (clone / "data" / "tasks" / remote_task).exists()

        # No path of either machine in the registry's metadata: artifacts are proxied by the server.
        client = MlflowClient(urls["mlflow_url"], urls["mlflow_url"])
        for task in tasks:
            version = client.get_model_version_by_alias(f"deltapatch-{task}", "champion")
            run = client.get_run(version.run_id)
            recorded = [run.info.artifact_uri, version.source, *run.data.params.values(), *run.data.tags.values()]
            assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
            leaked = [v for v in recorded if str(clone.parent) in v or (task == remote_task and str(root) in v)]
            assert not leaked, f"{task}: machine paths in the registry: {leaked}"
        assert {"shapes", "glyphs"} <= set(registry.champions(params))

        # The stack's machine serves the patch the other machine trained.
        image = next((tmp_path / "src" / remote_task).glob("*/*.png"))
        predict_tmp = tmp_path / "predict-tmp"
        predict_tmp.mkdir()
        env = {**{k: v for k, v in os.environ.items() if k not in FOREIGN}, "MLFLOW_DISABLE_TELEMETRY": "true",
               "TMPDIR": str(predict_tmp)}
        predicted = subprocess.run([*CLI, "predict", "--task", remote_task, "--json", str(image)], cwd=root, env=env,
                                   capture_output=True, text=True, timeout=300)
        assert predicted.returncode == 0, predicted.stderr[-2000:]
        assert json.loads(predicted.stdout)[0]["class"]
        # The model and its base came through the server into temporary folders, and went with them.
        assert sorted(p.name for p in predict_tmp.iterdir()) == []
        print(f"two arrivals, two workers: {wall:.0f} s wall; trainings "
              f"{[(r['labels'].get('prefect.worker.name'), r['start_time'], r['end_time']) for r in training]}")
    finally:
        stop(worker)
        entries = list(((stack.read_state(params) or {}).get("processes") or {}).values())
        stack.down(params)
        assert not [e["cmd"] for e in entries if stack.is_running(e)], "stack down left processes running"
