"""Base upgrades (issue 11) with a real Prefect API, the project's real MLflow sqlite registry and a real
git + DVC project: the rebase-patches flow, its gates, crash + re-run, the serving swap and rollback.

Two tiny tasks are trained (1 epoch) and promoted once for the module through the plain pipeline, and
each test works on a copy of that project; the "new base"
is the test base with its classifier bias nudged (another fingerprint, the same accuracy) or, for the
refused upgrade, with its classifier zeroed (chance accuracy)."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from deltapatch import pipeline
from deltapatch.config import load_params
from deltapatch.data.ingest import file_sha256
from tests.flows.conftest import new_project, write_task

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_harness", "isolated_env"),
              pytest.mark.xdist_group("rebase")]  # one worker builds the promoted project once

TASKS = ("shapes", "glyphs")
LENIENT = {"gate": {"min_patch_accuracy": 0.0, "base_upgrade_tolerance": 1.0, "rebase_tolerance": 1.0}}


@pytest.fixture(autouse=True)
def own_result_storage(tmp_path: Path) -> Any:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield


@pytest.fixture(scope="module")
def promoted_project(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project whose tasks each have a promoted patch (1 epoch, 8 images per class), made once for the
    module; each test works on its own copy (the project is relocatable: relative DVC remote, a sqlite
    registry whose `mlflow-artifacts:` URIs resolve beside it)."""
    folder = tmp_path_factory.mktemp("rebase-template")
    params = new_project(base_project, folder / "project", LENIENT)
    for task in TASKS:
        pipeline.run_pipeline(params, write_task(folder / "src", task, per_class=8), task, epochs=1, progress=False)
    return Path(params["_root"])


def _project(promoted: Path, tmp_path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the module's promoted project, with `overrides` (section → keys) written to its params.yaml."""
    root = tmp_path / "project"
    shutil.copytree(promoted, root, symlinks=True)
    content = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in (overrides or {}).items():
        content.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
    return load_params(root)


def _new_base(params: dict[str, Any], out: Path, *, zero_classifier: bool = False) -> Path:
    from safetensors.torch import save_file

    from deltapatch.config import resolve_path
    from deltapatch.models.base import read_state_dict

    state = read_state_dict(resolve_path(params, params["base"]["weights"]))
    name = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]
    if zero_classifier:
        state[name] = state[name] * 0
        state[name.replace("weight", "bias")] = state[name.replace("weight", "bias")] * 0
    else:
        state[name.replace("weight", "bias")] = state[name.replace("weight", "bias")] + 1e-3
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def _flow(params: dict[str, Any], base_version: int, **kw: Any) -> Any:
    from flows.rebase import rebase_patches_flow

    return rebase_patches_flow(base_version=base_version, project=params["_root"], train_on="inline",
                               return_state=True, **kw)


def _images(params: dict[str, Any]) -> np.ndarray:
    from deltapatch.data.dataset import load_task_dir
    from deltapatch.data.versioning import tasks_dir

    data = load_task_dir(tasks_dir(params) / "shapes", 32, name="shapes")
    return (data.test.images[:6].permute(0, 2, 3, 1).numpy()).astype(np.uint8)


def _body(images: np.ndarray) -> dict[str, Any]:
    from deltapatch.registry.runtime import encode_png

    return {"items": [{"task": task, "image": base64.b64encode(encode_png(img)).decode()}
                      for task in ("base", *TASKS) for img in images]}


class Client(threading.Thread):
    """Loops /predict (every task) until stopped; counts the answers that were not 200."""

    def __init__(self, client: Any, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.client, self.body, self.stop, self.ok, self.failed = client, body, threading.Event(), 0, []

    def run(self) -> None:
        while not self.stop.is_set():
            response = self.client.post("/predict", json=self.body)
            if response.status_code == 200:
                self.ok += 1
            else:
                self.failed.append(f"{response.status_code}: {response.text[:200]}")
            time.sleep(0.2)


def _wait_for_base(client: Any, fingerprint: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/health").json()["base_fingerprint"] != fingerprint:
        assert time.monotonic() < deadline, client.get("/tasks").json()
        time.sleep(0.5)


def _artifact(state: Any) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    only_this_run = ArtifactFilter(key=ArtifactFilterKey(any_=["rebase-patches"]),
                                   flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=only_this_run)
    assert len(found) == 1
    return str(found[0].data)


def test_upgrade_switches_once_trains_on_registered_data_and_rolls_back(promoted_project: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from deltapatch import base_versions
    from deltapatch.data.versioning import tasks_dir
    from deltapatch.registry import bases, registry
    from deltapatch.serve import create_app

    params = _project(promoted_project, tmp_path)
    old = registry.champions(params)
    body = _body(_images(params))
    # glyphs is re-ingested (not retrained) after registration: its folder no longer holds the champion's data
    registered_sha = file_sha256(tasks_dir(params) / "glyphs" / "manifest.csv")
    pipeline.ingest_step(params, write_task(tmp_path / "src2", "glyphs", per_class=8, seed=5), "glyphs")
    assert file_sha256(tasks_dir(params) / "glyphs" / "manifest.csv") != registered_sha

    new = base_versions.register_weights(params, _new_base(params, tmp_path / "in" / "new.safetensors"))
    with TestClient(create_app(params, poll_seconds=2.0)) as http:
        before = http.post("/predict", json=body).json()["results"]
        old_fp = http.get("/health").json()["base_fingerprint"]
        loop = Client(http, body)
        loop.start()  # a client keeps asking during the whole rebase and the switch
        state = _flow(params, new.version)
        assert state.is_completed(), state.message
        _wait_for_base(http, new.fingerprint)
        after_switch = http.get("/tasks").json()
        loop.stop.set()
        loop.join(60)
        assert loop.failed == [] and loop.ok > 0

        out = state.result()
        by_task = {o["task"]: o for o in out["outcomes"]}
        assert sorted(by_task) == sorted(TASKS) and all(o["passed"] for o in by_task.values())
        assert by_task["glyphs"]["manifest_sha256"] == registered_sha  # the registered DVC version, not the folder
        export = Path(params["_root"]) / ".deltapatch" / "exports" / f"glyphs-{registered_sha[:16]}" / "manifest.csv"
        assert file_sha256(export) == registered_sha  # read from DVC at that version; the working copy untouched
        assert file_sha256(tasks_dir(params) / "glyphs" / "manifest.csv") != registered_sha
        view = bases.serving_set(params)
        assert view.base_version == new.version and not view.unavailable
        for task, info in view.tasks.items():
            assert info["base_fingerprint"] == new.fingerprint and info["base_version"] == new.version
            assert info["version"] != old[task]["version"] and info["data_version"] == old[task]["data_version"]
            assert registry.champions(params)[task]["version"] == info["version"]  # per-task aliases followed
            assert after_switch[task]["version"] == info["version"]  # served together with the new base
        tags = bases.get_base(params, new.version).tags
        assert all(f"rebased/{t}" in tags for t in TASKS) and tags["switched_from"] == str(out["switch"]["from_version"])
        assert base_versions.local_fingerprint(params) == new.fingerprint  # base.weights follows (DVC-tracked)
        assert (Path(params["_root"]) / "models" / "base.safetensors.dvc").is_file()
        report = _artifact(state)
        assert "| task | version | accuracy (test) | gate |" in report and "base gate passed" in report
        assert f"| glyphs | v{old['glyphs']['version']} → v{view.tasks['glyphs']['version']} |" in report

        # a switch interrupted after its alias move (per-task alias left behind, base.weights stale) is
        # finished by the next `base` command, which adopts the base in service
        from deltapatch.registry.client import _client

        _client(params).set_registered_model_alias("deltapatch-shapes", "champion", str(old["shapes"]["version"]))
        assert bases.serving_set(params).tasks["shapes"]["version"] == view.tasks["shapes"]["version"]  # still right
        base_versions.adopt(params)
        assert registry.champions(params)["shapes"]["version"] == view.tasks["shapes"]["version"]

        record = base_versions.roll_back(params)
        assert record.to_version == out["switch"]["from_version"]
        back = bases.serving_set(params)
        assert {t: i["version"] for t, i in back.tasks.items()} == {t: i["version"] for t, i in old.items()}
        _wait_for_base(http, old_fp)
        assert base_versions.local_fingerprint(params) == old_fp
        assert http.post("/predict", json=body).json()["results"] == before  # bit-identical: same base, same patches


def test_worse_base_is_refused_and_nothing_is_trained(promoted_project: Path, tmp_path: Path) -> None:
    from deltapatch import base_versions
    from deltapatch.registry import bases, registry

    params = _project(promoted_project, tmp_path, {"gate": {"min_patch_accuracy": 0.0, "base_upgrade_tolerance": 0.0}})
    new = base_versions.register_weights(params, _new_base(params, tmp_path / "in" / "bad.safetensors", zero_classifier=True))
    state = _flow(params, new.version)
    assert state.is_failed() and "base gate REFUSED" in state.message and "nothing was trained" in state.message
    assert [v["version"] for v in registry.list_patches(params, "shapes")] == [1]
    assert bases.serving_set(params).base_version != new.version


def test_failed_task_gate_blocks_the_switch_then_allow_partial(promoted_project: Path, tmp_path: Path) -> None:
    from deltapatch.registry import bases, registry
    from deltapatch.registry.client import _client

    params = _project(promoted_project, tmp_path, {"gate": {"min_patch_accuracy": 0.0, "base_upgrade_tolerance": 1.0,
                                                        "rebase_tolerance": 0.0}})
    old = registry.champions(params)
    # the shapes champion's registered accuracy is out of reach: its rebased patch fails rebase_accuracy
    _client(params).set_model_version_tag("deltapatch-shapes", str(old["shapes"]["version"]), "patch_acc", "1.5")
    from deltapatch import base_versions

    new = base_versions.register_weights(params, _new_base(params, tmp_path / "in" / "new.safetensors"))
    state = _flow(params, new.version)
    assert state.is_failed() and "shapes" in state.message and "no switch" in state.message
    view = bases.serving_set(params)
    assert view.base_version != new.version
    assert {t: i["version"] for t, i in view.tasks.items()} == {t: i["version"] for t, i in old.items()}

    state = _flow(params, new.version, allow_partial=True)  # glyphs is reused, shapes fails again
    assert state.is_completed(), state.message
    view = bases.serving_set(params)
    assert view.base_version == new.version and set(view.tasks) == {"glyphs"} and "shapes" in view.unavailable
    assert "--allow-partial" in bases.get_base(params, new.version).tags["partial_release"]
    from fastapi.testclient import TestClient

    from deltapatch.serve import create_app

    with TestClient(create_app(params, poll_seconds=0)) as http:
        listed = http.get("/tasks").json()
        assert "glyphs" in listed and "shapes" not in listed and "shapes" in listed["unavailable"]
        assert http.get("/health").json()["base_fingerprint"] == view.fingerprint
    assert {o["task"]: o["reused"] for o in state.result()["outcomes"]} == {"glyphs": True, "shapes": False}


def test_crash_mid_fan_out_rerun_finishes_only_the_missing_tasks(promoted_project: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch import base_versions
    from deltapatch.config import ConfigError
    from deltapatch.registry import bases, registry

    params = _project(promoted_project, tmp_path)
    trained: list[str] = []
    real = pipeline.train_step

    def train_step(p: Any, task: str, *args: Any, **kwargs: Any) -> Any:
        trained.append(task)
        if task == "shapes" and trained.count("shapes") == 1:  # a failure no retry fixes: the run fails
            raise ConfigError("injected by the test: the fan-out dies at its second task")
        return real(p, task, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train_step", train_step)
    new = base_versions.register_weights(params, _new_base(params, tmp_path / "in" / "new.safetensors"))
    state = _flow(params, new.version)
    assert state.is_failed() and trained == ["glyphs", "shapes"]
    assert bases.serving_set(params).base_version != new.version
    state = _flow(params, new.version)
    assert state.is_completed(), state.message
    assert trained == ["glyphs", "shapes", "shapes"]  # glyphs was not trained again
    assert len([v for v in registry.list_patches(params, "glyphs") if v["base_version"] == new.version]) == 1
    assert bases.serving_set(params).base_version == new.version


def test_fan_out_on_the_gpu_pool(promoted_project: Path, tmp_path: Path) -> None:
    """Each task's training is a `train-patch/gpu` run picked up by a real `prefect worker` process, which
    fetches the new base from the registry (the worker's process does not have it)."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from deltapatch import base_versions
    from deltapatch.registry import bases
    from flows.deployments import deploy_training, ensure_pool
    from flows.rebase import rebase_patches_flow
    from tests.conftest import REPO_ROOT, kill_process_group

    params = _project(promoted_project, tmp_path, {"faults": {"poll_seconds": 0.5, "queue_timeout_s": 600}})
    ensure_pool("rebase-test", 2)
    deploy_training(params["_root"], "rebase-test")
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "PREFECT_HOME": str(tmp_path / "worker-home"),
           "PYTHONPATH": str(REPO_ROOT)}
    with (tmp_path / "worker.log").open("ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "rebase-test",
                                   "--type", "process"], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        new = base_versions.register_weights(params, _new_base(params, tmp_path / "in" / "new.safetensors"))
        state = rebase_patches_flow(base_version=new.version, project=params["_root"], train_on="pool",
                                    return_state=True)
    finally:
        kill_process_group(worker)
    assert state.is_completed(), f"{state.message}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
    view = bases.serving_set(params)
    assert view.base_version == new.version and sorted(view.tasks) == sorted(TASKS)
    assert all(info["base_fingerprint"] == new.fingerprint for info in view.tasks.values())
    assert "training(s) took" in state.result()["timing"]  # the fan-out's overhead is reported
