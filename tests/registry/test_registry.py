"""The MLflow patch registry against a real sqlite store: register, promote, rollback, predict."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deltapatch.errors import FingerprintMismatch, RegistryError
from tests.conftest import free_port
from tests.registry.conftest import TASK, Trained, direct_predictions, new_project, register


def _images(trained: Trained, n: int = 8) -> np.ndarray:
    return trained.data.test.images[:n].permute(0, 2, 3, 1).contiguous().numpy()


def _pyfunc_classes(uri: str, images: np.ndarray) -> tuple[list[str], np.ndarray]:
    import mlflow

    frame = mlflow.pyfunc.load_model(uri).predict(images)
    return list(frame["class"]), frame["score"].to_numpy()


def test_register_promote_rollback_and_predict(reg_project: dict[str, Any], trained: Trained,
                                               base_project: dict[str, Any]) -> None:
    import mlflow

    from deltapatch.registry import registry as R
    from deltapatch.registry.tracking import resolve_tracking_uri

    params = reg_project
    assert resolve_tracking_uri(params) == f"sqlite:///{Path(params['_root']) / '.deltapatch' / 'mlflow.db'}"
    first, second = trained.results
    images = _images(trained)

    # the base is registered once (idempotent), with its fingerprint as a tag
    base_v = R.register_base(params)
    assert R.register_base(params) == base_v
    base_info = R.get_version(params, "base")
    assert base_info["base_fingerprint"] == first.meta.base_fingerprint

    v1 = register(params, first, data=trained.data)
    assert v1 == 1
    info = R.get_version(params, TASK, version=v1)
    assert info["gate"] == "passed" and info["registration"] == "complete"
    assert info["base_fingerprint"] == first.meta.base_fingerprint and info["base_version"] == base_v
    assert info["data_version"] == "test-data-v1"
    assert info["patch_bytes"] == int(first.metrics["patch_bytes"])
    assert info["patch_acc"] == pytest.approx(first.metrics["patch_acc"], abs=1e-4)
    assert info["base_check"] == "bit-identical" and info["trainable_pct"] > 0

    # the run: params, per-epoch metrics, artifacts (patch, plots, report, gate)
    client = mlflow.tracking.MlflowClient()
    run = client.get_run(info["run_id"])
    assert run.data.params["train.lr"] == str(params["train"]["lr"])
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == len(first.fit.history)
    listed = {a.path for d in ("patch", "plots", "report") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"patch/patch.safetensors", "patch/patch.json", "plots/learning_curve.png", "plots/confusion_matrix.png",
            "report/evaluation.json", "report/gate.json"} <= listed

    # the model version holds the patch files only (no base weights), and says which base it needs
    local = Path(mlflow.artifacts.download_artifacts(f"models:/deltapatch-{TASK}/{v1}"))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "artifacts/patch/patch.safetensors" in files
    assert not any(f.endswith(("base.safetensors", ".pt", ".pth")) for f in files)
    mlmodel = (local / "MLmodel").read_text()
    assert "pyfunc_model.py" in mlmodel and "python_model.pkl" not in mlmodel  # models from code, no pickle
    assert first.meta.base_fingerprint in mlmodel and "signature" in mlmodel

    R.promote(params, TASK, v1, reason="first")
    champion_uri = f"models:/deltapatch-{TASK}@champion"
    expected1 = direct_predictions(base_project, first.patch_dir, images)
    classes, scores = _pyfunc_classes(champion_uri, images)
    assert classes == [r["class"] for r in expected1]
    np.testing.assert_allclose(scores, [r["score"] for r in expected1], atol=1e-5)

    v2 = register(params, second)
    assert v2 == 2
    R.promote(params, TASK, v2, reason="better")
    expected2 = direct_predictions(base_project, second.patch_dir, images)
    classes, scores = _pyfunc_classes(champion_uri, images)
    np.testing.assert_allclose(scores, [r["score"] for r in expected2], atol=1e-5)
    assert not np.allclose([r["score"] for r in expected1], [r["score"] for r in expected2])

    # a failed-gate version is registered for the record but can never become champion
    v3 = register(params, second, passed=False)
    assert R.get_version(params, TASK, version=v3)["gate"] == "failed"
    with pytest.raises(RegistryError, match="failed its gate"):
        R.promote(params, TASK, v3)
    with pytest.raises(RegistryError, match="failed its gate"):
        R.rollback(params, TASK, to=v3)
    with pytest.raises(RegistryError, match="no version 99"):
        R.rollback(params, TASK, to=99)
    assert R.get_version(params, TASK)["version"] == v2

    # rollback → previous gate-passed version, with when / from / why recorded
    assert R.rollback(params, TASK, reason="labels were wrong") == (v2, v1)
    back = R.get_version(params, TASK, alias="champion")
    assert back["version"] == v1
    assert back["tags"]["rolled_back_from"] == str(v2) and back["tags"]["rollback_reason"] == "labels were wrong"
    assert back["tags"]["rolled_back_at"]
    classes, scores = _pyfunc_classes(champion_uri, images)
    np.testing.assert_allclose(scores, [r["score"] for r in expected1], atol=1e-5)
    with pytest.raises(RegistryError, match="no gate-passed version older"):
        R.rollback(params, TASK)
    assert R.rollback(params, TASK, to=v2, reason="fixed") == (v1, v2)

    rows = R.list_patches(params)
    assert [r["version"] for r in rows] == [3, 2, 1]
    assert next(r for r in rows if r["version"] == 2)["aliases"] == ["champion"]
    assert set(R.champions(params)) == {TASK}
    folder = R.download_patch(params, TASK, alias="champion")
    assert (folder / "patch.safetensors").read_bytes() == (second.patch_dir / "patch.safetensors").read_bytes()

    # the base itself is a pyfunc too
    frame = mlflow.pyfunc.load_model(f"models:/deltapatch-base/{base_v}").predict(images)
    assert list(frame["class"]) == [r["class"] for r in direct_predictions(base_project, None, images)]

    _check_cli(params, trained, tmp=Path(params["_root"]))


def _check_cli(params: dict[str, Any], trained: Trained, tmp: Path) -> None:
    from typer.testing import CliRunner

    from deltapatch.cli import app
    from deltapatch.registry.runtime import encode_png

    runner = CliRunner(env={"COLUMNS": "220"})
    listed = runner.invoke(app, ["patches", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    keys = {"task", "version", "aliases", "gate", "patch_acc", "base_fingerprint", "data_version", "patch_bytes", "created"}
    assert rows and all(keys <= set(r) for r in rows)
    table = runner.invoke(app, ["patches", "list", "--task", TASK])
    assert table.exit_code == 0 and "champion" in table.output
    shown = runner.invoke(app, ["patches", "show", f"{TASK}@champion", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["version"] == 2
    refused = runner.invoke(app, ["patches", "rollback", TASK, "--to", "99"])
    assert refused.exit_code == 2 and "no version 99" in refused.output
    moved = runner.invoke(app, ["patches", "rollback", TASK, "--reason", "cli test"])
    assert moved.exit_code == 0 and "from version 2 to version 1" in moved.output

    paths = []
    for i, image in enumerate(_images(trained, 3)):
        path = tmp / f"img{i}.png"
        path.write_bytes(encode_png(image))
        paths.append(str(path))
    out = runner.invoke(app, ["predict", "--task", TASK, "--json", *paths])
    assert out.exit_code == 0, out.output
    predicted = json.loads(out.stdout)
    assert len(predicted) == 3 and all(p["version"] == 1 and p["class"] in trained.data.class_names for p in predicted)
    base = runner.invoke(app, ["predict", "--task", "base", *paths])
    assert base.exit_code == 0 and base.output.count("img") == 3
    missing = runner.invoke(app, ["predict", "--task", "nosuch", *paths])
    assert missing.exit_code == 2 and "nosuch" in missing.output


def test_fingerprint_refused_on_load(base_project: dict[str, Any], trained: Trained, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch made for another base is refused by the runtime and by registration."""
    import torch
    from safetensors.torch import save_file

    from deltapatch.models.base import load_base, read_state_dict
    from deltapatch.registry import registry as R
    from deltapatch.registry.runtime import Predictor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    other = new_project(base_project, tmp_path / "other")
    weights = Path(other["_root"]) / other["base"]["weights"]
    state = read_state_dict(weights)
    first = next(k for k, v in state.items() if v.dtype.is_floating_point and v.dim() == 4)
    state[first] = state[first] + 0.01
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    predictor = Predictor(load_base(other))
    with pytest.raises(FingerprintMismatch, match="refused"):
        predictor.add_patch(trained.results[0].patch_dir)
    assert predictor.tasks() == ["base"]
    # registering a patch for a base that is neither registered nor this project's is refused
    with pytest.raises(RegistryError, match="not registered"):
        R.register_patch(other, "no-run", trained.results[0], {"passed": True})
    assert torch.equal(read_state_dict(weights)[first], state[first])


def test_upload_failure_leaves_no_version(reg_project: dict[str, Any], trained: Trained) -> None:
    """Artifacts cannot be written → a clear error and no (half-)registered version."""
    from deltapatch.registry import registry as R
    from deltapatch.registry.tracking import configure

    params = reg_project
    configure(params)
    R.register_base(params)
    artifacts = Path(params["_root"]) / ".deltapatch" / "mlartifacts"
    import shutil

    shutil.rmtree(artifacts)
    artifacts.write_text("not a folder: every artifact upload fails\n")
    run_id = None
    with pytest.raises(RegistryError, match="no version was registered|failed"):
        run_id = R.log_patch_run(params, trained.results[0])
        R.register_patch(params, run_id, trained.results[0], {"passed": True})
    with pytest.raises(RegistryError):
        R.register_patch(params, run_id or "x", trained.results[0], {"passed": True})
    assert R.list_patches(params) == []


def test_unreachable_server_is_a_clear_error(reg_project: dict[str, Any], trained: Trained,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.registry import registry as R

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable.*after 2 tries"):
        R.register_patch(reg_project, "run", trained.results[0], {"passed": True})
    with pytest.raises(RegistryError, match="unreachable"):
        R.list_patches(reg_project)
    assert time.monotonic() - started < 30


def test_tracking_uri_resolution_order(reg_project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from deltapatch.registry.tracking import resolve_tracking_uri, ui_url

    params = reg_project
    state = Path(params["_root"]) / ".deltapatch"
    sqlite = f"sqlite:///{state / 'mlflow.db'}"
    assert resolve_tracking_uri(params) == sqlite and ui_url(params) is None
    (state / "stack").mkdir(parents=True)
    dead = f"http://127.0.0.1:{free_port()}"
    (state / "stack" / "stack.json").write_text(json.dumps({"mlflow_url": dead}))
    assert resolve_tracking_uri(params) == sqlite  # a stale stack file is ignored

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        live = f"http://127.0.0.1:{server.server_address[1]}"
        (state / "stack" / "stack.json").write_text(json.dumps({"mlflow_url": live, "pids": {}}))
        assert resolve_tracking_uri(params) == live and ui_url(params) == live
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/elsewhere.db")
        assert resolve_tracking_uri(params) == "sqlite:////tmp/elsewhere.db"
    finally:
        server.shutdown()


def test_concurrent_promotions_are_serialised(reg_project: dict[str, Any], trained: Trained) -> None:
    from filelock import FileLock

    from deltapatch.registry import registry as R

    params = reg_project
    v1 = register(params, trained.results[0])
    v2 = register(params, trained.results[1])
    lock = FileLock(str(Path(params["_root"]) / ".deltapatch" / "locks" / f"registry-{TASK}.lock"))
    done: list[Any] = []
    with lock:  # someone else is moving the alias
        worker = threading.Thread(target=lambda: done.append(R.promote(params, TASK, v1, "waits")))
        worker.start()
        worker.join(1.5)
        assert worker.is_alive() and not done  # blocked behind the lock
    worker.join(30)
    assert done and done[0]["to_version"] == v1

    results: list[Any] = []
    threads = [threading.Thread(target=lambda v=v: results.append(R.promote(params, TASK, v, f"race {v}")))
               for v in (v2, v1, v2, v1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    # serialised: each promotion saw the previous one's result as its "from" (a chain from v1 to the final)
    from collections import Counter

    final = R.get_version(params, TASK)["version"]
    froms = Counter(r["from_version"] for r in results)
    tos = Counter(r["to_version"] for r in results)
    assert froms + Counter([final]) == tos + Counter([v1])
