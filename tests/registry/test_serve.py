"""`deltapatch serve`: mixed batches answered correctly, alias moves followed, foreign bases refused."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.registry.conftest import TASK, Trained, direct_predictions, new_project, register


def _b64(image: np.ndarray) -> str:
    from deltapatch.registry.runtime import encode_png

    return base64.b64encode(encode_png(image)).decode()


def _wait_for(client: Any, version: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/tasks").json().get(TASK, {}).get("version") == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"serve did not switch {TASK} to version {version}: {client.get('/tasks').json()}")


def test_serve_mixed_batches_and_alias_moves(reg_project: dict[str, Any], trained: Trained,
                                            base_project: dict[str, Any], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.registry import registry as R
    from deltapatch.serve import create_app

    params = reg_project
    first, second = trained.results
    v1 = register(params, first)
    v2 = register(params, second)
    R.promote(params, TASK, v2, reason="serve test")

    images = trained.data.test.images[:6].permute(0, 2, 3, 1).contiguous().numpy()
    tasks = ["base", TASK, TASK, "base", TASK, "base"]
    expected = {
        v: {"base": direct_predictions(base_project, None, images), TASK: direct_predictions(base_project, r.patch_dir, images)}
        for v, r in ((v1, first), (v2, second))
    }

    def check(client: TestClient, version: int) -> None:
        body = {"items": [{"task": t, "image": _b64(img)} for t, img in zip(tasks, images, strict=True)]}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["task"] for r in results] == tasks
        for i, (task, got) in enumerate(zip(tasks, results, strict=True)):
            want = expected[version][task][i]
            assert got["class"] == want["class"], (i, task)
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
            assert set(got["scores"]) == set(want["scores"])
            assert got["version"] == ("" if task == "base" else str(version))

    with TestClient(create_app(params, poll_seconds=0.3)) as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["tasks"] == {TASK: v2}
        listed = client.get("/tasks").json()
        assert listed[TASK]["classes"] == trained.data.class_names and listed["refused"] == {}
        check(client, v2)

        R.rollback(params, TASK, reason="serve follows")   # no restart
        _wait_for(client, v1)
        check(client, v1)

        unknown = client.post("/predict", json={"items": [{"task": "nosuch", "image": _b64(images[0])}]})
        assert unknown.status_code == 404 and "nosuch" in unknown.text
        bad = client.post("/predict", json={"items": [{"task": TASK, "image": "***"}]})
        assert bad.status_code == 422

    # another project whose running base differs, reading the same registry: the patch is refused
    from safetensors.torch import save_file

    from deltapatch.models.base import read_state_dict

    db = Path(params["_root"]) / ".deltapatch" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    other = new_project(base_project, tmp_path / "other-base")
    weights = Path(other["_root"]) / other["base"]["weights"]
    state = read_state_dict(weights)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point and v.dim() == 4)
    state[key] = state[key] * 1.01
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    with TestClient(create_app(other, poll_seconds=0)) as client:
        listed = client.get("/tasks").json()
        assert TASK not in listed and "trained on base" in listed["refused"][TASK]
        response = client.post("/predict", json={"items": [{"task": TASK, "image": _b64(images[0])}]})
        assert response.status_code == 404
        assert client.post("/predict", json={"items": [{"task": "base", "image": _b64(images[0])}]}).status_code == 200
