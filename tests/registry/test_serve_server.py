"""`deltapatch serve`'s uvicorn configuration (deltapatch.serve.server_config, what `run` serves with),
against clients that hold connections: a real uvicorn on 127.0.0.1 (a thread of this process) and
raw sockets. Every wait is bounded by a socket timeout; nothing asserts on durations."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.registry.conftest import new_project

SERVE = {"read_timeout": 2, "max_items": 4, "max_body_bytes": 60_000, "max_header_bytes": 4096}
BOUND = 30.0  # seconds any single wait may take before the test fails (the server answers in ~2 s)


@pytest.fixture(scope="module")
def server(base_project: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The port of `deltapatch serve`'s uvicorn server (server_config) for a fresh project (one for
    the module: each test uses its own connections)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("DELTAPATCH_SERVE_TOKEN", raising=False)
        params = new_project(base_project, tmp_path_factory.mktemp("served") / "proj",
                             {"serve": SERVE, "registry": {"poll_seconds": 0}})
        yield from _serve(params)


def _serve(params: dict[str, Any]) -> Iterator[int]:
    import uvicorn

    from deltapatch.serve import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(params, "127.0.0.1", port)
    assert config.limit_concurrency == 64 and config.timeout_keep_alive == 5
    assert config.h11_max_incomplete_event_size == 4096
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    conn.settimeout(BOUND)
    return conn


def _response(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the next response on `conn` (read as soon as it is complete)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(conn)
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    length = {k.strip().lower(): v.strip() for k, v in fields.items()}.get(b"content-length")
    if length is None:  # close-delimited (uvicorn's own 400)
        while chunk := conn.recv(65536):
            body += chunk
    else:
        while len(body) < int(length):
            body += _recv(conn)
    return status, json.loads(body)


def _recv(conn: socket.socket) -> bytes:
    chunk = conn.recv(65536)
    assert chunk, "the server closed the connection without a (complete) response"
    return chunk


def test_request_head_must_arrive_within_read_timeout(server: int) -> None:
    """uvicorn's keep-alive timer restarts on every byte: a client trickling its headers held the
    connection (and a limit_concurrency slot) forever."""
    conn = _connect(server)
    conn.settimeout(0.3)
    closed = False
    deadline = time.monotonic() + BOUND
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 10_000
    try:
        for byte in request:  # one byte every 0.3 s, never the end of the head
            conn.sendall(bytes([byte]))
            try:
                closed = conn.recv(1024) == b""
            except TimeoutError:
                pass
            if closed or time.monotonic() > deadline:
                break
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    finally:
        conn.close()
    assert closed, "the server kept a connection whose request head never completed"


def test_slow_body_gets_408(server: int) -> None:
    conn = _connect(server)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + b'{"items": [')  # then nothing
    status, body = _response(conn)
    conn.close()
    assert status == 408 and "serve.read_timeout=2" in body["detail"], body


def test_too_many_items_are_refused_while_the_body_streams(server: int) -> None:
    """The body declares 50 kB (under serve.max_body_bytes) but its first 4 kB already hold more items
    than serve.max_items: the 413 comes before the rest is sent."""
    conn = _connect(server)
    items = b",".join([b'{"task":"base","image":"AAAA"}'] * 100)
    conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 50000\r\n\r\n" + b'{"items": [' + items)
    status, body = _response(conn)
    conn.close()
    assert status == 413 and "serve.max_items=4" in body["detail"], body


def test_host_header_over_the_network(server: int) -> None:
    url = f"http://127.0.0.1:{server}"
    for host in (f"127.0.0.1:{server}", f"localhost:{server}", "[::1]"):
        assert httpx.get(url + "/tasks", headers={"Host": host}, timeout=BOUND).status_code == 200, host
    for host in ("testserver", f"rebind.attacker.example:{server}"):  # TestClient's name only in process
        response = httpx.get(url + "/tasks", headers={"Host": host}, timeout=BOUND)
        assert response.status_code == 421 and "serve.allowed_hosts" in response.json()["detail"], host


def test_oversized_request_head_gets_a_json_400(server: int) -> None:
    conn = _connect(server)
    # h11 refuses to buffer more than serve.max_header_bytes of a head that is not complete yet
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8000)
    status, body = _response(conn)
    conn.close()
    assert status == 400 and "serve.max_header_bytes" in body["detail"], body


def test_stack_command_line_options_carry_the_same_limits() -> None:
    """uvicorn_cli_args: the limits for a `python -m uvicorn --factory ...` command (the stack's)."""
    from uvicorn.main import main

    from deltapatch.serve import GuardedH11Protocol, ServeSettings, uvicorn_cli_args

    args = uvicorn_cli_args(ServeSettings(limit_concurrency=7, timeout_keep_alive=3, max_header_bytes=2048))
    parsed = main.make_context("uvicorn", ["--factory", "deltapatch.stack:serve_app_factory", *args]).params
    assert parsed["http"] == f"{GuardedH11Protocol.__module__}:GuardedH11Protocol"
    assert (parsed["limit_concurrency"], parsed["timeout_keep_alive"], parsed["h11_max_incomplete_event_size"]) == (
        7, 3, 2048)
