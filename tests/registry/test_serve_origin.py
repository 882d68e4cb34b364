"""`deltapatch serve` against cross-site requests (the real app, FastAPI TestClient): a web page the
user visits may POST to a loopback server without a CORS preflight only as text/plain, form data or
with no type, and a DNS-rebinding page reaches it under the attacker's host name; /health must not
hand the registry's error text to callers without the token."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.image_samples import png_bytes
from tests.registry.conftest import new_project

BODY = {"items": [{"task": "base", "image": base64.b64encode(png_bytes(7)).decode()}]}


def _params(base_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            serve: dict[str, Any] | None = None) -> dict[str, Any]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
    return new_project(base_project, tmp_path / "proj", {"serve": serve or {},
                                                         "registry": {"retries": 1, "retry_delay_s": 0.1}})


def test_posts_need_a_json_content_type(base_project: dict[str, Any], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.serve import create_app

    app = create_app(_params(base_project, tmp_path, monkeypatch), poll_seconds=0)
    raw = json.dumps(BODY).encode()
    with TestClient(app) as client:
        for path in ("/predict", "/reload"):
            for headers in ({"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"},
                            {"content-type": "multipart/form-data; boundary=x"}, {}):
                response = client.post(path, content=raw, headers=headers)
                assert response.status_code == 415, (path, headers, response.text)
                assert "Content-Type: application/json" in response.json()["detail"]
        ok = client.post("/predict", content=raw, headers={"content-type": "Application/JSON; charset=utf-8"})
        assert ok.status_code == 200, ok.text
        assert client.post("/reload", json={}).status_code == 200


def test_foreign_host_names_are_refused(base_project: dict[str, Any], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.serve import create_app

    params = _params(base_project, tmp_path, monkeypatch, {"allowed_hosts": ["serve.lan"]})
    with TestClient(create_app(params, poll_seconds=0)) as client:
        for host in ("rebind.attacker.example", "rebind.attacker.example:8765", "localhost.attacker.example",
                     "127.0.0.1.nip.io"):
            for method, path, kwargs in (("get", "/tasks", {}), ("get", "/health", {}), ("get", "/docs", {}),
                                         ("post", "/predict", {"json": BODY})):
                response = getattr(client, method)(path, headers={"host": host}, **kwargs)
                assert response.status_code == 421, (host, path, response.text)
                assert "serve.allowed_hosts" in response.json()["detail"]
        for host in ("localhost:8765", "127.0.0.1", "127.0.0.1:8765", "[::1]:8765", "192.168.1.10:8765",
                     "serve.lan:8765", "SERVE.LAN"):
            assert client.get("/tasks", headers={"host": host}).status_code == 200, host
        assert client.get("/tasks").status_code == 200  # the in-process TestClient's own "testserver"

    explicit = create_app(params, poll_seconds=0, allowed_hosts=["only.example"])
    with TestClient(explicit) as client:
        assert client.get("/tasks", headers={"host": "only.example"}).status_code == 200
        assert client.get("/tasks", headers={"host": "serve.lan"}).status_code == 421


def test_health_without_the_token_is_generic(base_project: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from fastapi.testclient import TestClient

    from deltapatch.serve import create_app

    params = _params(base_project, tmp_path, monkeypatch)
    monkeypatch.setenv("DELTAPATCH_SERVE_TOKEN", "s3cret-token")
    auth = {"Authorization": "Bearer s3cret-token"}
    with TestClient(create_app(params, poll_seconds=0)) as client:
        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)  # the registry goes away: the next poll fails
        assert client.post("/reload", json={}).status_code == 401  # the token guards /reload on loopback too
        assert client.post("/reload", json={}, headers=auth).status_code == 200
        full = client.get("/health", headers=auth).json()
        assert dead in full["registry_error"] and "limits" in full and full["auth"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            generic = client.get("/health", headers=headers)
            assert generic.status_code == 200 and generic.json() == {"status": "ok", "auth": True}, generic.text
