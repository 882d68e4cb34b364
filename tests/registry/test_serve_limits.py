"""`deltapatch serve` under bad input, without a token, and while a broken champion is promoted: the
real app (FastAPI TestClient), a real sqlite MLflow registry and real trained patches."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from deltapatch.data.images import encode_png
from tests.image_samples import bomb_png, encoded, exif_rotated_jpeg, flat_png, png_bytes, rgba_png
from tests.registry.conftest import TASK, Trained, new_project, register

LIMITS = {"max_items": 4, "max_body_bytes": 60_000, "max_image_pixels": 100_000, "decode_threads": 2}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(*items: tuple[str, bytes]) -> dict[str, Any]:
    return {"items": [{"task": task, "image": _b64(data)} for task, data in items]}


@pytest.fixture
def limited(base_project: dict[str, Any], trained: Trained, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A project with small serve limits and one promoted real patch of TASK."""
    from deltapatch.registry import registry as R

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    params = new_project(base_project, tmp_path / "proj", {"serve": LIMITS,
                                                           "registry": {"retries": 2, "retry_delay_s": 0.1}})
    R.promote(params, TASK, register(params, trained.results[0]), reason="serve limits test")
    return params


def test_bad_requests_get_their_4xx_and_never_reach_the_model(limited: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.serve import create_app

    app = create_app(limited, poll_seconds=0)
    predictor = app.state.predictor
    forwards: list[int] = []
    real_predict = predictor.predict
    predictor.predict = lambda images, tasks, **kw: forwards.append(len(tasks)) or real_predict(images, tasks, **kw)
    good = png_bytes(1)

    def post(body: Any, status: int, *needles: str, **kwargs: Any) -> None:
        response = client.post("/predict", json=body, **kwargs) if body is not None else client.post("/predict", **kwargs)
        assert response.status_code == status, response.text
        for needle in needles:
            assert needle in response.json()["detail"], response.text

    with TestClient(app, raise_server_exceptions=False) as client:
        post(_body(("base", good), (TASK, bomb_png(30_000, 30_000))), 422,
             "items[1].image", "900000000 pixels", "serve.max_image_pixels=100000", "decompression bomb")
        post(_body((TASK, good), ("base", flat_png(400, 400))), 422,
             "items[1].image: 400×400 = 160000 pixels, above serve.max_image_pixels=100000")
        post(_body(*[("base", good)] * 5), 413, "5 items, above serve.max_items=4")
        big = _body(("base", png_bytes(2, 150, 150)))  # ~90 kB of base64 noise
        post(big, 413, "serve.max_body_bytes=60000")
        # no Content-Length (chunked upload): refused while streaming, as soon as the limit is passed
        post(None, 413, "above serve.max_body_bytes=60000",
             content=(chunk for chunk in [json.dumps(big).encode()[i:i + 8192] for i in range(0, 100_000, 8192)]),
             headers={"content-type": "application/json"})
        for fmt in ("ICO", "TGA", "PCX"):
            post(_body((TASK, encoded(fmt))), 422, "items[0].image: not a PNG, JPEG, WebP, BMP, GIF or TIFF image")
        post(_body((TASK, b"GIF89a garbage")), 422, "items[0].image")
        post({"items": [{"task": TASK, "image": "***"}]}, 422, "items[0].image: not valid base64")
        post({"items": [{"task": TASK}]}, 422, "items.0.image: Field required")
        post(None, 422, "invalid request", content=b"{not json", headers={"content-type": "application/json"})
        post(_body(("nosuch", good)), 404, "nosuch", "served: ['base', 'shapes']")
        assert forwards == [], "a request that fails validation must not reach the model"

        ok = client.post("/predict", json=_body(("base", good), (TASK, exif_rotated_jpeg(3)), (TASK, rgba_png(4))))
        assert ok.status_code == 200, ok.text
        assert [r["task"] for r in ok.json()["results"]] == ["base", TASK, TASK] and forwards == [3]
        limits = client.get("/health").json()["limits"]
        assert {k: limits[k] for k in LIMITS} == LIMITS


def test_token_guards_predict_reload_and_tasks(project: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.serve import check_exposure, create_app, serve_settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DELTAPATCH_SERVE_TOKEN", "s3cret-token")
    body = _body(("base", png_bytes(5)))
    with TestClient(create_app(project, poll_seconds=0)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["auth"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic s3cret-token"}):
            for method, path, kwargs in (("post", "/predict", {"json": body}), ("post", "/reload", {"json": {}}),
                                         ("get", "/tasks", {})):
                response = getattr(client, method)(path, headers=headers, **kwargs)
                assert response.status_code == 401, (path, headers, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                assert "DELTAPATCH_SERVE_TOKEN" in response.json()["detail"]
        auth = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/predict", json=body, headers=auth).status_code == 200
        assert client.post("/reload", json={}, headers=auth).status_code == 200
        assert client.get("/tasks", headers=auth).json()["refused"] == {}
    check_exposure("0.0.0.0", serve_settings(project))  # a token is set: allowed


def test_serve_on_all_interfaces_refuses_to_start_without_a_token(project: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltapatch.cli import app
    from deltapatch.serve import check_exposure, serve_settings

    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    monkeypatch.setenv("DELTAPATCH_PROJECT", project["_root"])
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["serve", "--host", "0.0.0.0", "--port", "9"])
    assert result.exit_code == 2, result.output
    assert "refusing to serve on 0.0.0.0 without a token" in result.output
    assert "DELTAPATCH_SERVE_TOKEN" in result.output
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, serve_settings(project))  # loopback: no token needed
    for host in ("::", "192.168.1.10", "myhost.example"):
        with pytest.raises(Exception, match="refusing to serve"):
            check_exposure(host, serve_settings(project))


def _artifact_file(params: dict[str, Any], version: int) -> Path:
    """The registered patch.safetensors of `version` inside the local artifact store."""
    from mlflow.tracking import MlflowClient

    from deltapatch.registry.store import artifacts_beside, local_path_of, sqlite_path
    from deltapatch.registry.tracking import configure

    uri = configure(params)
    location = MlflowClient(uri, uri).get_model_version_download_uri(f"deltapatch-{TASK}", str(version))
    folder = local_path_of(location, artifacts_beside(sqlite_path(uri)))  # proxied URI → file beside the DB
    path = folder / "artifacts" / "patch" / "patch.safetensors"
    assert path.is_file(), path
    return path


def test_broken_champion_leaves_the_previous_version_serving(reg_project: dict[str, Any], trained: Trained) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.registry import registry as R
    from deltapatch.serve import create_app

    params = reg_project
    first, second = trained.results
    v1, v2 = register(params, first), register(params, second)
    R.promote(params, TASK, v1, reason="good one")
    tensors = _artifact_file(params, v2)
    intact = tensors.read_bytes()
    tensors.write_bytes(intact[: len(intact) // 3])  # a corrupt upload / a damaged artifact store
    image = encode_png(trained.data.test.images[0].permute(1, 2, 0).numpy())
    body = _body((TASK, image), ("base", image))

    def answer(client: TestClient) -> str:
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text  # never 409 or 5xx while versions move
        return response.json()["results"][0]["version"]

    with TestClient(create_app(params, poll_seconds=0.3), raise_server_exceptions=False) as client:
        assert answer(client) == str(v1)
        R.promote(params, TASK, v2, reason="deliberately broken")
        deadline = time.monotonic() + 30
        refused: dict[str, str] = {}
        while time.monotonic() < deadline and TASK not in refused:
            assert answer(client) == str(v1)
            refused = client.get("/tasks").json()["refused"]
            time.sleep(0.1)
        assert f"version {v2}:" in refused.get(TASK, ""), refused
        assert client.get("/tasks").json()[TASK]["version"] == v1
        for _ in range(5):  # later polls retry v2 and fail again; v1 keeps answering
            assert answer(client) == str(v1)
            time.sleep(0.3)
        assert client.get("/health").json()["tasks"] == {TASK: v1}

        tensors.write_bytes(intact)  # repaired: the next poll retries and serves v2
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and answer(client) != str(v2):
            time.sleep(0.2)
        assert answer(client) == str(v2)
        assert client.get("/tasks").json()["refused"] == {}
