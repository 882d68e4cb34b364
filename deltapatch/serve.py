"""`deltapatch serve`: one HTTP service for the base model and every `champion` patch.

    GET  /health   → {"status": "ok", "base_fingerprint", "tasks": {task: version}, "registry_error",
                      "limits": {...}}    (always open; with a token configured, a request without it
                                           gets only {"status": "ok", "auth": true})
    GET  /tasks    → {"base": {...}, task: {"version", "classes", "patch_acc", "data_version"}, ...,
                      "refused": {task: reason}, "unavailable": {task: reason}}
                   (unavailable: tasks with no patch for the base in service, e.g. after
                   `deltapatch base upgrade --allow-partial`)
    POST /predict  {"items": [{"task": "shapes", "image": "<base64 image file>"}, ...]}
                   → {"results": [{"task", "version", "class", "class_index", "score", "scores"}, ...]}
                   (ONE forward for the whole request, shared with the requests queued at
                   the same time: deltapatch/batching.py)
    POST /reload   → re-read the champion aliases now (also done every registry.poll_seconds)

Bad input never reaches the model and never gets a 5xx (params.yaml ``serve:``, docs/serving.md):

- a body above ``serve.max_body_bytes`` → 413, refused from Content-Length before it is read, or
  as soon as the streamed body passes the limit; more than ``serve.max_items`` items → 413, also
  while the body streams, from a count of its '{', '[' and ',' bytes (read_body: an upper bound on the
  JSON values, so parsing never builds more than a few hundred); a body not received within
  ``serve.read_timeout`` → 408;
- invalid JSON or fields → 422; an unknown task → 404 naming the served ones;
- an item whose image is not base64, not an allowed format, unreadable, or above
  ``serve.max_image_pixels`` (read from the header, before decoding: decompression bombs) → 422
  naming the item (``items[3].image``) and the limit; the images of one request holding more than
  ``serve.max_request_pixels`` in all (headers again, nothing decoded) → 413. Images are decoded by
  the one image pipeline (deltapatch/data/images.py), in a pool of ``serve.decode_threads`` threads
  shared by all requests, which also bounds the memory spent on decoding.
- more than ``serve.max_inflight`` /predict requests at once, or ``serve.max_queue`` requests already
  waiting for a forward → 503 with ``Retry-After``. uvicorn (`run`) adds ``serve.limit_concurrency``,
  ``serve.timeout_keep_alive``, ``serve.max_header_bytes`` and a ``serve.read_timeout`` deadline on
  each request head (GuardedH11Protocol).

Every route is behind RequestGuard: a Host header that is not an IP address, localhost, the bound host
or a ``serve.allowed_hosts`` name → 421 (DNS rebinding), and POST without ``Content-Type:
application/json`` → 415 (what a cross-site page can send without a CORS preflight is refused).

With a token (``DELTAPATCH_SERVE_TOKEN`` or ``serve.token``), /predict, /reload and /tasks need
``Authorization: Bearer <token>`` (401 otherwise), whatever the bound host; a non-loopback ``--host``
refuses to start without one.

Hot reload is safe: a task whose `champion` alias moves is downloaded into a fresh folder and swapped
in only once it loaded. A base switch (`deltapatch base upgrade|rollback`) builds the new base and all
its patches first, then swaps one reference (ChampionSync); requests accepted before finish on the old set. A version that fails (corrupt files, another base's fingerprint, MLflow
unreachable) is reported under "refused" in /tasks, the previous version keeps serving, and the next
poll retries it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h11
import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from deltapatch.access import is_loopback
from deltapatch.base_versions import serving_base_params
from deltapatch.batching import ForwardBatcher, QueueFull
from deltapatch.config import ConfigError, section
from deltapatch.data.images import ALLOWED_FORMATS, FORMAT_NAMES, ImageError, ImageTooLarge, load_pixels
from deltapatch.errors import DeltapatchError
from deltapatch.models.base import load_base
from deltapatch.registry.bases import ServingSet, serving_set
from deltapatch.registry.registry import download_patch
from deltapatch.registry.runtime import Predictor
from deltapatch.registry.tracking import configure, registry_settings
from deltapatch.train import TrainSettings, resolve_device

log = logging.getLogger("deltapatch.serve")

TOKEN_ENV = "DELTAPATCH_SERVE_TOKEN"
MAX_LISTED = 5  # item errors named in one 422 message


@dataclass
class ServeSettings:
    """params.yaml `serve:` section: request limits and access of `deltapatch serve` (host, port and
    poll period are in `registry:`, shared with the stack)."""

    max_items: int = 64                 # images per /predict request (413 above)
    max_body_bytes: int = 16 * 2**20    # request body (413 above)
    max_image_pixels: int = 16_000_000  # width × height of one image, from its header (422 above)
    max_request_pixels: int = 32_000_000  # width × height summed over a request's images, from headers (413 above)
    decode_threads: int = 2             # images decoded at once, over all requests
    torch_threads: int = 0              # torch intra-op threads of the serving process; 0 = torch's default
    batch_images: int = 128             # concurrent requests share one forward up to this many images
    group_from: int = 0                 # shared batches this large run one forward per task (0: never; docs/serving.md)
    max_queue: int = 16                 # requests waiting for a forward (503 + Retry-After above)
    max_inflight: int = 32              # /predict requests being read, decoded or answered at once (503 above)
    limit_concurrency: int = 64         # uvicorn: connections + requests at once (its own 503 above)
    read_timeout: float = 30.0          # seconds for a request's head (uvicorn) and for its body (408)
    timeout_keep_alive: int = 5         # uvicorn: seconds an idle keep-alive connection stays open
    max_header_bytes: int = 16384       # uvicorn/h11: request line + headers (400 above)
    allowed_hosts: list[str] = field(default_factory=list)  # extra Host names besides localhost, IPs, the bound host
    token: str = ""                     # bearer token; DELTAPATCH_SERVE_TOKEN overrides it

    def __post_init__(self) -> None:
        for name in ("max_items", "max_body_bytes", "max_image_pixels", "max_request_pixels", "decode_threads",
                     "batch_images", "max_queue", "max_inflight", "limit_concurrency", "timeout_keep_alive",
                     "max_header_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"params.yaml: serve.{name} must be at least 1, got {getattr(self, name)!r}")
        if int(self.torch_threads) < 0 or int(self.group_from) < 0:
            raise ConfigError("params.yaml: serve.torch_threads and serve.group_from must be 0 or more")
        if not float(self.read_timeout) > 0:
            raise ConfigError(f"params.yaml: serve.read_timeout must be above 0 seconds, got {self.read_timeout!r}")
        if not isinstance(self.allowed_hosts, list) or not all(isinstance(h, str) and h for h in self.allowed_hosts):
            raise ConfigError(f"params.yaml: serve.allowed_hosts must be a list of host names, got {self.allowed_hosts!r}")


def serve_settings(params: dict[str, Any]) -> ServeSettings:
    return section(params, "serve", ServeSettings)


def serve_token(settings: ServeSettings) -> str | None:
    """The bearer token in force: $DELTAPATCH_SERVE_TOKEN, else serve.token, else None (no auth)."""
    return os.environ.get(TOKEN_ENV) or settings.token or None


def check_exposure(host: str, settings: ServeSettings) -> None:
    """Refuse to listen beyond this machine without a token: anyone reaching the port could use it."""
    if not is_loopback(host) and serve_token(settings) is None:
        raise ConfigError(
            f"refusing to serve on {host} without a token: anyone who can reach it could call /predict "
            f"and /reload; set {TOKEN_ENV}=<secret> (or serve.token in params.yaml) and send "
            "'Authorization: Bearer <secret>', or bind 127.0.0.1"
        )


class Item(BaseModel):
    task: str = Field(description="task name, or 'base'")
    image: str = Field(description=f"base64 of an image file ({FORMAT_NAMES})")


class PredictRequest(BaseModel):
    items: list[Item]


class RequestRejected(Exception):
    """A request refused before it reaches the model: HTTP `status` with `detail` saying why."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


RETRY_AFTER = {"Retry-After": "1"}  # seconds; sent with every 503 (busy: retry later)
JSON_MEDIA_TYPE = "application/json"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Starlette's in-process TestClient: its scope names the client "testclient" and carries the
# "http.response.debug" extension, which no socket connection can produce (uvicorn sets the client
# from the peer address, or from X-Forwarded-For, and never that extension); its Host is "testserver".
TEST_CLIENT, TEST_HOST, TEST_EXTENSION = "testclient", "testserver", "http.response.debug"


def host_name(header: str) -> str:
    """The host part of a Host header, lower-case, without port or IPv6 brackets."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_host_names(params: dict[str, Any], *bound: str | None) -> frozenset[str]:
    """Host names the app answers (IP literals are always accepted, see RequestGuard): localhost, the
    host(s) it is bound to (`bound`; by default registry.serve_host and stack.host) and
    serve.allowed_hosts."""
    hosts = list(bound) if bound else [registry_settings(params).serve_host, (params.get("stack") or {}).get("host")]
    names = ["localhost", *(h for h in hosts if h), *serve_settings(params).allowed_hosts]
    return frozenset(host_name(str(n)) for n in names)


class RequestGuard:
    """ASGI middleware in front of every route, against cross-site requests and DNS rebinding:

    - the Host header must name this server: an IP literal (a rebinding page's Host is always the
      attacker's *name*), localhost, the bound host or a serve.allowed_hosts name; else 421 (400 when
      missing). Starlette's in-process TestClient (see TEST_CLIENT) is accepted with its "testserver".
    - POST/PUT/PATCH/DELETE need ``Content-Type: application/json`` (415): a web page can send a
      cross-site request without a CORS preflight only as text/plain, form data or no type at all.
    """

    def __init__(self, app: Any, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        hosts = 0
        for key, value in scope.get("headers", []):
            name = key.decode("latin-1").lower()
            hosts += name == "host"
            headers.setdefault(name, value.decode("latin-1"))
        problem = (400, "more than one Host header") if hosts > 1 else self.refusal(scope, headers)
        if problem is None:
            await self.app(scope, receive, send)
            return
        status, detail = problem
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    def refusal(self, scope: Any, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host")
        if not host:
            return 400, "missing Host header"
        name = host_name(host)
        in_process = (scope.get("client") or ("",))[0] == TEST_CLIENT and TEST_EXTENSION in (scope.get("extensions") or {})
        if not (name in self.allowed or _is_ip(name) or (in_process and name == TEST_HOST)):
            return 421, (f"Host {host[:100]!r} is not a name of this server (DNS rebinding?); use its IP address, "
                         f"localhost or the bound host, or add the name to serve.allowed_hosts")
        if scope["method"] in UNSAFE_METHODS:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != JSON_MEDIA_TYPE:
                return 415, (f"{scope['method']} needs 'Content-Type: {JSON_MEDIA_TYPE}', got "
                             f"{(media or 'none')[:100]!r} (refused: cross-site requests can send other types)")
        return None


class ChampionSync:
    """Keeps a Predictor equal to the registry's serving set (deltapatch.registry.bases.serving_set:
    the base in service and the patch version of each task made for it), never losing a version that
    serves: a new patch is swapped in only once it loaded.

    A new base is a new Predictor: the base and every patch of the set are loaded into it first, then
    ONE reference (`self.predictor`, read by each request when it is accepted) is swapped, so requests
    never see a mix of bases and those already accepted finish on the old set. When any part of the new
    set fails to load, the old set keeps serving and the reason is under "refused"."""

    def __init__(self, params: dict[str, Any], predictor: Any, device: torch.device | str | None = None,
                 on_swap: Callable[[Any], None] | None = None) -> None:
        self.params = params
        self.predictor = predictor
        self.device = device
        self.on_swap = on_swap  # told the new Predictor after a base swap (the batcher's default)
        self.base_version: int | None = None  # the registered base served (None: the local base.weights)
        self.unavailable: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        self.last_error = ""
        self._sync_lock = threading.Lock()

    def refresh(self) -> dict[str, int]:
        """Load/replace/drop patches (or swap the whole set) to match the serving set; returns {task: version}."""
        with self._sync_lock:
            try:
                view = serving_set(self.params)
                self.last_error = ""
            except DeltapatchError as exc:
                self.last_error = str(exc)
                log.warning("champion poll failed (still serving %s): %s", self.served(), exc)
                return self.served()
            if view.fingerprint and view.fingerprint != self.predictor.fingerprint:
                self._swap(view)
                return self.served()
            self.base_version = view.base_version
            self.unavailable = dict(view.unavailable)
            wanted = view.tasks
            for task in list(self.predictor.patches):
                if task not in wanted:
                    self.predictor.remove_patch(task)
                    log.info("task %s has no champion any more; unloaded", task)
            for task in list(self.refused):
                if task not in wanted and task != "base":
                    del self.refused[task]
            self.refused.pop("base", None)
            for task, info in wanted.items():
                version = int(info["version"])
                loaded = self.predictor.patches.get(task)
                if loaded is not None and loaded.version == str(version):
                    self.refused.pop(task, None)  # e.g. rolled back from a refused version
                    continue
                self._load(self.predictor, task, version, info)
            self.predictor.prepare()
            return self.served()

    def _swap(self, view: ServingSet) -> None:
        """Build the new base + all its patches, then swap the one reference (see the class doc)."""
        try:
            params = serving_base_params(self.params, view)
            fresh = Predictor(load_base(params, self.device or "cpu"))
            for task, info in view.tasks.items():
                if not self._load(fresh, task, int(info["version"]), info):
                    raise DeltapatchError(f"patch {task} v{info['version']} did not load: {self.refused.get(task)}")
            fresh.prepare()
        # Any failure keeps the complete old set serving; the next poll retries the swap.
        except Exception as exc:  # noqa: BLE001
            reason = f"base v{view.base_version}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            if self.refused.get("base") != reason:
                log.error("refused the switch to %s (still serving base %s)", reason, self.base_version)
            self.refused["base"] = reason
            return
        old = self.base_version
        self.predictor = fresh  # THE swap: requests accepted from now on use the new set
        self.base_version = view.base_version
        self.unavailable = dict(view.unavailable)
        self.refused = {}
        if self.on_swap is not None:
            self.on_swap(fresh)
        log.info("switched from base v%s to base v%s with %s", old, view.base_version, self.served())

    def _load(self, predictor: Any, task: str, version: int, info: dict[str, Any]) -> bool:
        folder = Path(tempfile.mkdtemp(prefix=f"deltapatch-serve-{task}-v{version}-"))
        try:
            patch_dir = download_patch(self.params, task, version=version, dst=folder)
            predictor.add_patch(patch_dir, version=str(version), info=info)
            self.refused.pop(task, None)
            log.info("serving %s version %s", task, version)
            return True
        # Any failure (registry, files, tensors) must leave the previous version serving and the
        # poller alive, so this is deliberately broad; the reason is shown under /tasks "refused".
        except Exception as exc:  # noqa: BLE001
            reason = f"version {version}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            if self.refused.get(task) != reason:
                current = self.predictor.patches.get(task)
                keeping = f"still serving version {current.version}" if current else "not served"
                log.error("refused %s %s (%s; retried on the next poll)", task, reason, keeping)
            self.refused[task] = reason
            return False
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the tensors are in memory now

    def served(self) -> dict[str, int]:
        return {task: int(p.version) for task, p in list(self.predictor.patches.items())}


# A legitimate body, {"items": [{"task": "...", "image": "<base64>"}, ...]}, holds one '{' per item plus
# one, one '[' and two ',' per item; base64 and task names hold none of these characters. Counting
# them anywhere in the bytes (inside strings too: an over-count only) bounds the number of JSON values
# the parser will build, without parsing.
SHAPE_SLACK = 8


async def read_body(request: Any, limit: int, max_items: int | None = None, timeout: float | None = None) -> bytes:
    """The request body, refusing (413) one above `limit` bytes before reading it when Content-Length
    says so, else as soon as the streamed bytes pass the limit.

    `max_items`: refuse (413) as soon as the bytes received hold more '{'/'[' than `max_items` items
    need (+ SHAPE_SLACK), or more ',' than 3 per item (+ SHAPE_SLACK): a cheap, chunk-wise upper bound on
    the JSON values in the body, checked while it streams and before any parsing, so that parsing
    (on the event loop) never builds more than a few hundred values — e.g. a few MB of tiny items.
    `timeout`: the whole body must arrive within it (408), so a slow sender cannot hold a request.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestRejected(413, f"request body of {size} bytes is above serve.max_body_bytes={limit}; "
                                       "send fewer or smaller images per request")
    chunks: list[bytes] = []
    received = containers = commas = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise RequestRejected(413, f"request body above serve.max_body_bytes={limit} bytes; "
                                               "send fewer or smaller images per request")
                if max_items is not None:
                    containers += chunk.count(b"{") + chunk.count(b"[")
                    commas += chunk.count(b",")
                    if containers > max_items + SHAPE_SLACK or commas > 3 * max_items + SHAPE_SLACK:
                        raise RequestRejected(413, f"request has more items (or JSON values) than serve.max_items="
                                                   f"{max_items} allows; split it into several requests")
                chunks.append(chunk)
    except ClientDisconnect:  # nobody reads the answer; refused without a traceback in the log
        raise RequestRejected(400, f"client disconnected after {received} bytes of the body") from None
    except TimeoutError:
        raise RequestRejected(408, f"request body not received within serve.read_timeout={timeout or 0:g} s "
                                   f"({received} bytes so far)") from None
    return b"".join(chunks)


def parse_request(body: bytes, settings: ServeSettings) -> PredictRequest:
    """JSON → PredictRequest (422 naming the bad fields; 413 above serve.max_items items)."""
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        more = f" … and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise RequestRejected(422, "invalid request: " + "; ".join(problems[:MAX_LISTED]) + more
                              + ' (expected {"items": [{"task": ..., "image": "<base64>"}, ...]})') from None
    if len(request.items) > settings.max_items:
        raise RequestRejected(413, f"request has {len(request.items)} items, above serve.max_items="
                                   f"{settings.max_items}; split it into several requests")
    return request


def _raw_image(index: int, item: Item) -> bytes:
    try:
        return base64.b64decode(item.image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestRejected(422, f"items[{index}].image: not valid base64 ({exc})") from None


def _pixels(index: int, raw: bytes, size: int, max_pixels: int) -> np.ndarray:
    try:
        return load_pixels(raw, size, max_pixels)
    except ImageTooLarge as exc:
        raise RequestRejected(422, f"items[{index}].image: {exc}, above serve.max_image_pixels={max_pixels} "
                                   "(decompression bomb?); downscale it") from None
    except ImageError as exc:
        raise RequestRejected(422, f"items[{index}].image: {exc}") from None


def header_pixels(raw: bytes) -> int | None:
    """width × height from the image header (PIL's open reads only the header), None when unreadable."""
    try:
        with Image.open(io.BytesIO(raw), formats=ALLOWED_FORMATS) as image:
            width, height = image.size
            return int(width) * int(height)
    except Exception:  # noqa: BLE001 (any failure: the full pipeline then names the reason)
        return None


def inspect_item(index: int, item: Item, max_pixels: int) -> tuple[bytes, int]:
    """An item's image bytes and header pixel count, nothing decoded; RequestRejected(422) naming the
    item when it is not base64, unreadable, or above `max_pixels` (the pipeline's own message)."""
    raw = _raw_image(index, item)
    pixels = header_pixels(raw)
    if pixels is None or pixels > max_pixels:
        _pixels(index, raw, 1, max_pixels)  # raises the pipeline's reason, before decoding (header or format)
        raise RequestRejected(422, f"items[{index}].image: unreadable image header")
    return raw, pixels


def decode_item(index: int, item: Item, size: int, max_pixels: int) -> np.ndarray:
    """One item's base64 image → (size, size, 3) uint8; RequestRejected(422) naming the item."""
    return _pixels(index, _raw_image(index, item), size, max_pixels)


def _gather(outcomes: list[Any]) -> list[Any]:
    errors = [o.detail for o in outcomes if isinstance(o, RequestRejected)]
    if errors:
        more = f"; … and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise RequestRejected(422, "; ".join(errors[:MAX_LISTED]) + more)
    return outcomes


def decode_items(items: list[Item], size: int, settings: ServeSettings, pool: ThreadPoolExecutor) -> np.ndarray:
    """Every item decoded in `pool`; all failing items are named in one 422. First every header is read
    (nothing decoded): the per-image limit (422) and the sum of width × height over the request,
    serve.max_request_pixels (413), are checked before any pixel is decoded."""

    def attempt(func: Callable[..., Any], *args: Any) -> Any:
        try:
            return func(*args)
        except RequestRejected as exc:
            return exc

    headers = _gather(list(pool.map(lambda pair: attempt(inspect_item, pair[0], pair[1], settings.max_image_pixels),
                                    enumerate(items))))
    total = sum(pixels for _, pixels in headers)
    if total > settings.max_request_pixels:
        raise RequestRejected(413, f"the request's {len(items)} images hold {total} pixels in all (width × height "
                                   f"from their headers), above serve.max_request_pixels={settings.max_request_pixels}; "
                                   "send fewer or smaller images per request")
    images = _gather(list(pool.map(lambda pair: attempt(_pixels, pair[0], pair[1][0], size, settings.max_image_pixels),
                                   enumerate(headers))))
    return np.stack(images)


def token_matches(token: str, authorization: str | None) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time (the time taken does not reveal how
    much of the token matched)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _bearer_guard(token: str | None) -> Callable[..., None]:
    def guard(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        if not token_matches(token, authorization):
            raise HTTPException(401, f"missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                     f"(the token of {TOKEN_ENV} or serve.token)",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


def create_app(params: dict[str, Any], *, poll_seconds: float | None = None, device: str | None = None,
               allowed_hosts: Iterable[str] | None = None) -> Any:
    """The FastAPI app: loads the base in service (deltapatch.registry.bases; the local base.weights
    before any base version) and its patches at start-up.

    `allowed_hosts`: the Host names it answers besides IP literals (RequestGuard); default
    :func:`allowed_host_names` (localhost, registry.serve_host, stack.host, serve.allowed_hosts)."""
    settings = serve_settings(params)
    hosts = frozenset(host_name(h) for h in allowed_hosts) if allowed_hosts is not None else allowed_host_names(params)
    if settings.torch_threads > 0:  # process-wide: set by the process that serves
        torch.set_num_threads(settings.torch_threads)
    interval = registry_settings(params).poll_seconds if poll_seconds is None else float(poll_seconds)
    configure(params)
    dev = resolve_device(device or section(params, "train", TrainSettings).device)
    try:  # the registered base in service (the local base.weights before any, or while MLflow is down)
        base_params = serving_base_params(params, serving_set(params))
    except DeltapatchError as exc:
        log.warning("serving the local base.weights for now (%s); the next poll retries the registry", exc)
        base_params = params
    predictor = Predictor(load_base(base_params, dev))
    batcher = ForwardBatcher(predictor, settings.batch_images, settings.group_from, max_queue=settings.max_queue)
    sync = ChampionSync(params, predictor, dev, on_swap=lambda fresh: setattr(batcher, "predictor", fresh))
    sync.refresh()
    pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="deltapatch-decode")
    token = serve_token(settings)
    authorized = [Depends(_bearer_guard(token))]
    inflight = [0]  # /predict requests being handled (the event loop's thread only: no lock)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def poll() -> None:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(0.2, interval))
                if not stop.is_set():
                    await asyncio.to_thread(sync.refresh)

        task = asyncio.create_task(poll()) if interval > 0 else None
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task
            pool.shutdown(wait=False, cancel_futures=True)
            batcher.close()

    app = FastAPI(title="deltapatch", version="1", lifespan=lifespan)
    app.add_middleware(RequestGuard, allowed=hosts)
    app.state.sync = sync
    app.state.predictor = sync.predictor
    app.state.allowed_hosts = hosts

    def swapped(fresh: Predictor) -> None:
        batcher.predictor = fresh
        app.state.predictor = fresh

    sync.on_swap = swapped
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(RequestRejected)
    async def rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.get("/health")
    def health(authorization: str | None = Header(default=None)) -> dict[str, Any]:
        """Open; with a token configured, only a generic status unless the request carries it (the
        registry's error text, served tasks and limits are for the token's holders)."""
        if token is not None and not token_matches(token, authorization):
            return {"status": "ok", "auth": True}
        limits = {k: v for k, v in asdict(settings).items() if k != "token"}
        return {"status": "ok", "base_fingerprint": sync.predictor.fingerprint, "base_version": sync.base_version,
                "tasks": sync.served(),
                "registry_error": sync.last_error, "limits": limits, "auth": token is not None}

    @app.get("/tasks", dependencies=authorized)
    def tasks() -> dict[str, Any]:
        current = sync.predictor  # one set, read once
        out: dict[str, Any] = {"base": {"version": sync.base_version or "", "classes": current.class_names("base"),
                                        "fingerprint": current.fingerprint}}
        for name, patch in list(current.patches.items()):
            out[name] = {"version": int(patch.version), "classes": list(patch.meta.class_names),
                         "patch_acc": patch.info.get("patch_acc"), "data_version": patch.info.get("data_version", "")}
        out["refused"] = dict(sync.refused)
        out["unavailable"] = dict(sync.unavailable)  # tasks with no patch for the base in service, and why
        return out

    @app.post("/reload", dependencies=authorized)
    def reload() -> dict[str, Any]:
        return {"tasks": sync.refresh(), "refused": dict(sync.refused)}

    @app.post("/predict", dependencies=authorized)
    async def predict(request: Request) -> JSONResponse:
        """Body: {"items": [{"task": "<task or base>", "image": "<base64 image file>"}, ...]}."""
        if inflight[0] >= settings.max_inflight:
            raise RequestRejected(503, f"busy: {inflight[0]} /predict requests in progress (serve.max_inflight="
                                       f"{settings.max_inflight}); retry shortly", RETRY_AFTER)
        inflight[0] += 1
        try:
            return await answer(request)
        finally:
            inflight[0] -= 1

    async def answer(request: Request) -> JSONResponse:
        body = await read_body(request, settings.max_body_bytes, settings.max_items, settings.read_timeout)
        parsed = parse_request(body, settings)
        del body
        if not parsed.items:
            return JSONResponse({"results": []})
        names = [item.task for item in parsed.items]
        predictor = sync.predictor  # the set that accepts this request answers it (deltapatch/batching.py)
        unknown = sorted({t for t in names if t != "base" and t not in predictor.patches})
        if unknown:
            named = [name[:64] for name in unknown[:MAX_LISTED]] + (["…"] if len(unknown) > MAX_LISTED else [])
            why = "; ".join(f"{t}: {sync.unavailable[t]}" for t in unknown[:MAX_LISTED] if t in sync.unavailable)
            raise RequestRejected(404, f"no champion patch served for task(s) {named}; served: {predictor.tasks()}"
                                       + (f"; unavailable: {why}" if why else ""))
        if batcher.full():  # refused before the costly decoding
            raise queue_full()
        images = await run_in_threadpool(decode_items, parsed.items, predictor.input_size, settings, pool)
        try:  # shared with the requests queued at the same time (deltapatch/batching.py)
            results = await asyncio.wrap_future(batcher.submit(images, names, predictor))
        except QueueFull:
            raise queue_full() from None
        except DeltapatchError as exc:  # e.g. a task whose champion was removed since the check
            raise RequestRejected(409, str(exc)) from None
        return JSONResponse({"results": results})

    def queue_full() -> RequestRejected:
        return RequestRejected(503, f"busy: {batcher.queued} requests already wait for a forward (serve.max_queue="
                                    f"{settings.max_queue}); retry shortly", RETRY_AFTER)

    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head (request line + headers):
    `head_timeout` seconds from the connection, or from the previous response, else the connection
    is closed. uvicorn's own keep-alive timer restarts on every byte received, so without this a
    client sending one byte every few seconds (or an open connection sending nothing) would hold a
    connection, and a serve.limit_concurrency slot, forever. Subclassed per server
    (:func:`uvicorn_options`) with serve.read_timeout."""

    head_timeout: float = ServeSettings.read_timeout
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to an unparsable request head (e.g. above serve.max_header_bytes), as JSON."""
        detail = f"{msg} (malformed, or request line + headers above serve.max_header_bytes)"
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=json.dumps({"detail": detail}).encode())))
        self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_deadline)

    def _disarm_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline(self) -> None:
        self._head_timer = None
        # no request head completed since the timer was armed: no cycle, or the previous one's
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.logger.info("closing a connection whose request head did not arrive within %g s", self.head_timeout)
            self.transport.close()


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn.run/Config keyword arguments from serve settings: concurrency limit, keep-alive and
    request-head timeouts (GuardedH11Protocol), header size limit."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"head_timeout": float(settings.read_timeout)})
    return {"http": protocol, "limit_concurrency": int(settings.limit_concurrency),
            "timeout_keep_alive": int(settings.timeout_keep_alive),
            "h11_max_incomplete_event_size": int(settings.max_header_bytes)}


def uvicorn_cli_args(settings: ServeSettings) -> list[str]:
    """The same limits as uvicorn command-line options, for `python -m uvicorn --factory ...` (the stack):
    the request-head deadline there is GuardedH11Protocol's default (ServeSettings.read_timeout)."""
    return ["--http", f"{__name__}:GuardedH11Protocol", "--limit-concurrency", str(settings.limit_concurrency),
            "--timeout-keep-alive", str(settings.timeout_keep_alive),
            "--h11-max-incomplete-event-size", str(settings.max_header_bytes)]


def server_config(params: dict[str, Any], host: str | None = None, port: int | None = None,
                  app: Any = None) -> uvicorn.Config:
    """The uvicorn configuration of `deltapatch serve` (see :func:`run`); `app` default: create_app
    with the Host names of `host`."""
    settings = registry_settings(params)
    host = host or settings.serve_host
    limits = serve_settings(params)
    if app is None:
        app = create_app(params, allowed_hosts=allowed_host_names(params, host))
    return uvicorn.Config(app, host=host, port=int(port or settings.serve_port), log_level="info",
                          **uvicorn_options(limits))


def run(params: dict[str, Any], host: str | None = None, port: int | None = None) -> None:
    """Serve with uvicorn (blocking). A non-loopback `host` needs a token (see check_exposure)."""
    host = host or registry_settings(params).serve_host
    check_exposure(host, serve_settings(params))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(server_config(params, host, port)).run()
