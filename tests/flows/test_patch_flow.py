"""The patch-task flow in-process under a real Prefect API (prefect_test_harness) and a real MLflow
sqlite registry in the project: happy path, bad dataset, crash + resume, failed gate, a resubmitted
arrival that reuses its finished training."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deltapatch import pipeline
from deltapatch.faults import training_key
from deltapatch.pipeline import checkpoint_path
from tests.conftest import free_port, kill_process_group, start_mlflow_server, wait_for_mlflow
from tests.flows.conftest import new_project, write_task

pytestmark = pytest.mark.usefixtures("prefect_harness", "isolated_env")


@pytest.fixture(autouse=True)
def own_result_storage(tmp_path: Path) -> Any:
    """Each test its own Prefect result storage: the training tasks are cached on their training key,
    which an earlier session with the same --basetemp (same project paths, same data) would match."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield


def _run(params: dict[str, Any], path: Path, task: str | None = None, **kw: Any) -> Any:
    from flows.patch_task import patch_task_flow

    return patch_task_flow(path=str(path), task_name=task, project=params["_root"], train_on="inline",
                           return_state=True, **kw)


def _versions(params: dict[str, Any], task: str) -> list[dict[str, Any]]:
    from deltapatch.errors import RegistryError
    from deltapatch.registry import registry

    try:
        return registry.list_patches(params, task)
    except RegistryError:
        return []


def _artifact(task: str, state: Any) -> str:
    """The summary artifact of the run behind `state` (the key is shared by every run of the task)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    only_this_run = ArtifactFilter(key=ArtifactFilterKey(any_=[f"patch-{task}"]),
                                   flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=only_this_run)
    assert len(found) == 1, f"expected one summary artifact for the run, found {len(found)}"
    return str(found[0].data)


def test_flow_registers_and_promotes_then_failed_gate_keeps_champion(base_project, tmp_path: Path) -> None:
    from deltapatch.registry import registry

    params = new_project(base_project, tmp_path / "project")
    src = write_task(tmp_path / "src", "shapes")
    state = _run(params, src, "shapes")
    assert state.is_completed(), state.message
    out = state.result()
    assert out["status"] == "promoted" and out["version"] == "1"
    assert registry.champions(params)["shapes"]["version"] == 1
    report = _artifact("shapes", state)
    assert "promoted" in report and "bit-identical" in report and "data version" in report

    # New data for the same task whose patch cannot reach the bar: registered as failed, not promoted.
    (Path(params["_root"]) / "params.yaml").write_text(
        (Path(params["_root"]) / "params.yaml").read_text().replace("min_patch_accuracy: 0.0", "min_patch_accuracy: 1.0"))
    src2 = write_task(tmp_path / "src2", "shapes", seed=1)
    state = _run(params, src2, "shapes")
    assert state.is_failed()
    assert "patch_accuracy" in state.message and "short by" in state.message and "not promoted" in state.message
    versions = {v["version"]: v for v in _versions(params, "shapes")}
    assert versions[2]["gate"] == "failed" and not versions[2]["aliases"]
    assert registry.champions(params)["shapes"]["version"] == 1  # the serving version is untouched
    assert "gate failed" in _artifact("shapes", state)

    # The same data again: nothing new to version, its finished training reused; the report says so
    # before the gate's words.
    state = _run(params, write_task(tmp_path / "src3", "shapes", seed=1), "shapes")
    assert state.is_failed() and "version 3 registered as failed" in state.message
    report = _artifact("shapes", state)
    assert "exact duplicate of this task's data version" in report and "gate failed for 'shapes'" in report


def test_bad_dataset_fails_run_quarantines_and_registers_nothing(base_project, tmp_path: Path) -> None:
    params = new_project(base_project, tmp_path / "project")
    inbox = Path(params["_root"]) / "inbox"
    bad = inbox / "broken"
    (bad / "only-class").mkdir(parents=True)
    for i in range(6):
        (bad / "only-class" / f"{i}.png").write_bytes(b"not a png")
    state = _run(params, bad, "broken")
    assert state.is_failed()
    assert not bad.exists()  # moved out of the inbox …
    quarantined = list((Path(params["_root"]) / "data" / "quarantine").glob("*broken*/reason.txt"))
    assert quarantined  # … into quarantine, with the reason
    assert _versions(params, "broken") == []


class InjectedCrash(RuntimeError):
    """The training fault this test injects (a RuntimeError: retried, as a crashed worker would be)."""


def _count_and_crash(monkeypatch: pytest.MonkeyPatch, crash_after_epoch: int | None = None) -> dict[str, list[int]]:
    """Wrap pipeline.train_step (what the flow's training task calls): record every epoch trained and,
    once, raise right after `crash_after_epoch` has been checkpointed — the training process dying there."""
    seen: dict[str, list[int]] = {"calls": [], "epochs": [], "crashed_after": []}
    real_train_step = pipeline.train_step

    def train_step(*args: Any, on_epoch: Any = None, **kwargs: Any) -> Any:
        seen["calls"].append(1)

        def hook(record: Any) -> None:
            seen["epochs"].append(record.epoch)
            if on_epoch is not None:
                on_epoch(record)
            if record.epoch == crash_after_epoch and not seen["crashed_after"]:
                seen["crashed_after"].append(record.epoch)
                raise InjectedCrash(f"injected by the test: the training died after epoch {record.epoch}")

        return real_train_step(*args, on_epoch=hook, **kwargs)

    monkeypatch.setattr(pipeline, "train_step", train_step)
    return seen


def test_training_crash_is_retried_and_resumes_from_checkpoint(base_project, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    params = new_project(base_project, tmp_path / "project", {"train": {"epochs": 2}})
    seen = _count_and_crash(monkeypatch, crash_after_epoch=1)
    src = write_task(tmp_path / "src", "glyphs")
    state = _run(params, src, "glyphs")
    assert state.is_completed(), state.message
    assert len(seen["calls"]) == 2, "the first attempt crashed and the task was retried once"
    out = state.result()
    assert seen["crashed_after"] == [1], "the fault was injected"
    assert seen["epochs"] == [1, 2], "the retry trained epoch 2 only: it resumed from the checkpoint"
    assert out["resumed_from_epoch"] == 1
    assert out["status"] == "promoted"
    assert "resumed after epoch 1" in _artifact("glyphs", state)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:  # the training sub-flow, named by flows.patch_task._train_run_name
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert [c.name for c in children] == ["train-glyphs"]
    from deltapatch.data.ingest import file_sha256

    manifest = Path(params["_root"]) / "data" / "tasks" / "glyphs" / "manifest.csv"
    assert not checkpoint_path(params, "glyphs", file_sha256(manifest)).exists()  # cleaned after success


def test_pipeline_without_prefect_promotes_then_registers_a_failed_gate(base_project, tmp_path: Path) -> None:
    """run_pipeline chains the same finish (gate → register → promote) as the flow, in this process."""
    from deltapatch.errors import GateFailed
    from deltapatch.registry import registry

    params = new_project(base_project, tmp_path / "project")
    outcome = pipeline.run_pipeline(params, write_task(tmp_path / "src", "shapes"), "shapes", progress=False)
    assert (outcome.status, outcome.version) == ("promoted", "1")
    assert outcome.message.startswith("gate passed for 'shapes'")
    assert registry.champions(params)["shapes"]["version"] == 1

    failing = dict(params, gate={"min_patch_accuracy": 1.0, "interference_tolerance": 0.0})
    with pytest.raises(GateFailed, match="short by .* version 2 registered as failed, not promoted"):
        pipeline.run_pipeline(failing, write_task(tmp_path / "src2", "shapes", seed=1), "shapes", progress=False)
    versions = {v["version"]: v for v in _versions(params, "shapes")}
    assert versions[2]["gate"] == "failed" and not versions[2]["aliases"]
    assert registry.champions(params)["shapes"]["version"] == 1


def test_resubmitted_arrival_reuses_its_finished_training(base_project, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    params = new_project(base_project, tmp_path / "project")
    seen = _count_and_crash(monkeypatch)
    first = _run(params, write_task(tmp_path / "src", "shapes"), "shapes")
    assert first.is_completed(), first.message
    again = _run(params, write_task(tmp_path / "again", "shapes"), "shapes")  # the same dataset, submitted again
    assert again.is_completed(), again.message
    assert len(seen["calls"]) == 1, "the second arrival trained again"
    out = again.result()
    assert out["training_reused"] and not first.result()["training_reused"]
    assert out["metrics"] == first.result()["metrics"]
    report = _artifact("shapes", again)
    assert "reused the finished training" in report and "exact duplicate" in report

    # The key that caches it: another recipe, data or epoch count is another training (not reused).
    sha = "0" * 64
    key = training_key(params, "shapes", sha)
    assert key == training_key(pipeline.project_params(params["_root"]), "shapes", sha)
    other_lr = {**params, "train": {**params["train"], "lr": params["train"]["lr"] * 2}}
    assert key != training_key(other_lr, "shapes", sha)
    assert key != training_key(params, "shapes", "1" * 64) and key != training_key(params, "shapes", sha, epochs=7)


@pytest.mark.e2e
def test_mlflow_restart_after_training_is_ridden_out_and_training_ran_once(
        base_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: the MLflow server dies right after training and is back 30 s later; the same flow run
    gates, registers and promotes, and the patch was trained once."""

    store = tmp_path / "mlflow"
    store.mkdir()
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")  # the shared server, nothing local
    params = new_project(base_project, tmp_path / "project", {"train": {"epochs": 2}})
    servers = [start_mlflow_server(store, port)]
    wait_for_mlflow(servers[0], store, port)  # a running server restarts, not one killed while creating its store
    outage: dict[str, float] = {}
    seen = _count_and_crash(monkeypatch)  # counts training calls and epochs, injects nothing
    real_train_step = pipeline.train_step

    def train_then_kill_mlflow(*args: Any, **kwargs: Any) -> Any:
        trained = real_train_step(*args, **kwargs)
        kill_process_group(servers[0])
        outage["down"] = time.monotonic()

        def restart() -> None:
            time.sleep(30)
            servers.append(start_mlflow_server(store, port))
            outage["restarted"] = time.monotonic()

        threading.Thread(target=restart, daemon=True).start()
        return trained

    monkeypatch.setattr(pipeline, "train_step", train_then_kill_mlflow)
    try:
        state = _run(params, write_task(tmp_path / "src", "glyphs"), "glyphs")
    finally:
        for server in servers:
            kill_process_group(server)
    assert "restarted" in outage, "the fault was injected: MLflow was down and came back"
    assert state.is_completed(), state.message
    assert state.result()["status"] == "promoted"
    assert len(seen["calls"]) == 1 and seen["epochs"] == [1, 2], "trained once, both epochs, no retraining"
    print(f"MLflow down for {outage['restarted'] - outage['down']:.0f} s; the flow finished after it came back")
