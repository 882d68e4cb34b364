"""`deltapatch serve` under load-shaped abuse, in process (FastAPI TestClient, the real app on the
session's base): bodies with too many JSON values, requests whose images hold too many pixels in
all, a full forward queue and too many requests at once. Each is refused with its 4xx/503 and a JSON
reason before it costs parsing, decoding or a forward."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.image_samples import flat_png, png_bytes
from tests.registry.conftest import new_project


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _body(*images: bytes) -> dict[str, Any]:
    return {"items": [{"task": "base", "image": _b64(data)} for data in images]}


def served(base_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **serve: Any) -> Any:
    """The app of a fresh project (the session's base, no patch) with these serve settings."""
    from deltapatch.serve import create_app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    params = new_project(base_project, tmp_path / "proj", {"serve": serve,
                                                           "registry": {"retries": 1, "retry_delay_s": 0.1}})
    return create_app(params, poll_seconds=0)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _post_in_thread(client: Any, body: dict[str, Any], into: dict[str, Any], name: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: into.__setitem__(name, client.post("/predict", json=body)), daemon=True)
    thread.start()
    return thread


def test_json_values_beyond_max_items_are_refused_before_parsing(base_project: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    app = served(base_project, tmp_path, monkeypatch, max_items=4, max_body_bytes=200_000)
    with TestClient(app) as client:
        # No item at all, but ~50 000 JSON values for the parser to build (the schema ignores "x")
        padded = b'{"items": [], "x": [' + b",".join([b"[]"] * 50_000) + b"]}"
        response = client.post("/predict", content=padded, headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert "more items (or JSON values) than serve.max_items=4" in response.json()["detail"]
        # tiny items, far more than allowed: refused from the byte count, while the body streams
        tiny = b'{"items": [' + b",".join([b'{"task":"base","image":""}'] * 5_000) + b"]}"
        response = client.post("/predict", content=tiny, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "serve.max_items=4" in response.json()["detail"], response.text
        # at the limit (and with a few extra fields): parsed and answered
        ok = client.post("/predict", json={**_body(*[png_bytes(i) for i in range(4)]), "note": [1, 2, 3]})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 4, ok.text


def test_pixels_summed_over_a_request_are_refused_from_the_headers(base_project: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    app = served(base_project, tmp_path, monkeypatch, max_image_pixels=100_000, max_request_pixels=150_000)
    predictor = app.state.predictor
    forwards: list[int] = []
    real_predict = predictor.predict
    predictor.predict = lambda images, tasks, **kw: forwards.append(len(tasks)) or real_predict(images, tasks, **kw)
    with TestClient(app) as client:
        # each image is under the per-image limit, together they are not: a few kB, 180 000 pixels
        response = client.post("/predict", json=_body(flat_png(300, 300), flat_png(300, 300)))
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert "180000 pixels in all" in detail and "serve.max_request_pixels=150000" in detail, detail
        # the per-image check still names its item first
        response = client.post("/predict", json=_body(png_bytes(1), flat_png(400, 400)))
        assert response.status_code == 422 and "items[1].image: 400×400" in response.json()["detail"], response.text
        assert forwards == []
        ok = client.post("/predict", json=_body(flat_png(300, 300), png_bytes(2)))
        assert ok.status_code == 200 and forwards == [2], ok.text


def test_full_queue_and_too_many_requests_get_503_with_retry_after(base_project: dict[str, Any], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    body = _body(png_bytes(3))
    for limits, needle in (({"max_queue": 1, "max_inflight": 8}, "serve.max_queue=1"),
                           ({"max_queue": 8, "max_inflight": 2}, "serve.max_inflight=2")):
        app = served(base_project, tmp_path / needle, monkeypatch, **limits)
        predictor, batcher = app.state.predictor, app.state.batcher
        answers: dict[str, Any] = {}
        with TestClient(app) as client:
            with predictor.lock:  # the forward thread blocks in the first request's forward
                first = _post_in_thread(client, body, answers, "first")
                _wait(lambda b=batcher: b.forwards >= 1, "the first forward")
                second = _post_in_thread(client, body, answers, "second")
                _wait(lambda b=batcher: b.queued == 1, "the second request to queue")
                third = _post_in_thread(client, body, answers, "third")
                third.join(60)  # refused at once: it neither queues nor waits for the lock
                assert "third" in answers, f"{needle}: the request beyond the limit was not answered"
            for thread in (first, second):
                thread.join(60)
        refused = answers["third"]
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1" and needle in refused.json()["detail"], refused.text
        assert answers["first"].status_code == answers["second"].status_code == 200
