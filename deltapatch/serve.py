"""`deltapatch serve`: one HTTP service for the base model and every `champion` patch.

    GET  /health   → {"status": "ok", "base_fingerprint", "tasks": {task: version}, "registry_error",
                      "limits": {...}}                                   (always open, no token)
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
  as soon as the streamed body passes the limit; more than ``serve.max_items`` items → 413;
- invalid JSON or fields → 422; an unknown task → 404 naming the served ones;
- an item whose image is not base64, not an allowed format, unreadable, or above
  ``serve.max_image_pixels`` (read from the header, before decoding: decompression bombs) → 422
  naming the item (``items[3].image``) and the limit. Images are decoded by the one image pipeline
  (deltapatch/data/images.py), in a pool of ``serve.decode_threads`` threads shared by all requests,
  which also bounds the memory spent on decoding.

With a token (``DELTAPATCH_SERVE_TOKEN`` or ``serve.token``), /predict, /reload and /tasks need
``Authorization: Bearer <token>`` (401 otherwise); a non-loopback ``--host`` refuses to start
without one.

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
import ipaddress
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from deltapatch.base_versions import serving_base_params
from deltapatch.batching import ForwardBatcher
from deltapatch.config import ConfigError, section
from deltapatch.data.images import FORMAT_NAMES, ImageError, ImageTooLarge, load_pixels
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
    decode_threads: int = 2             # images decoded at once, over all requests
    torch_threads: int = 0              # torch intra-op threads of the serving process; 0 = torch's default
    batch_images: int = 128             # concurrent requests share one forward up to this many images
    group_from: int = 64                # shared batches this large run one forward per task (0: never)
    token: str = ""                     # bearer token; DELTAPATCH_SERVE_TOKEN overrides it

    def __post_init__(self) -> None:
        for name in ("max_items", "max_body_bytes", "max_image_pixels", "decode_threads", "batch_images"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"params.yaml: serve.{name} must be at least 1, got {getattr(self, name)!r}")
        if int(self.torch_threads) < 0 or int(self.group_from) < 0:
            raise ConfigError("params.yaml: serve.torch_threads and serve.group_from must be 0 or more")


def serve_settings(params: dict[str, Any]) -> ServeSettings:
    return section(params, "serve", ServeSettings)


def serve_token(settings: ServeSettings) -> str | None:
    """The bearer token in force: $DELTAPATCH_SERVE_TOKEN, else serve.token, else None (no auth)."""
    return os.environ.get(TOKEN_ENV) or settings.token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to anything
        return False


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

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


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
            return self.served()

    def _swap(self, view: ServingSet) -> None:
        """Build the new base + all its patches, then swap the one reference (see the class doc)."""
        try:
            params = serving_base_params(self.params, view)
            fresh = Predictor(load_base(params, self.device or "cpu"))
            for task, info in view.tasks.items():
                if not self._load(fresh, task, int(info["version"]), info):
                    raise DeltapatchError(f"patch {task} v{info['version']} did not load: {self.refused.get(task)}")
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


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) one above `limit` bytes before reading it when Content-Length
    says so, else as soon as the streamed bytes pass the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestRejected(400, f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            raise RequestRejected(413, f"request body of {size} bytes is above serve.max_body_bytes={limit}; "
                                       "send fewer or smaller images per request")
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise RequestRejected(413, f"request body above serve.max_body_bytes={limit} bytes; "
                                       "send fewer or smaller images per request")
        chunks.append(chunk)
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


def decode_item(index: int, item: Item, size: int, max_pixels: int) -> np.ndarray:
    """One item's base64 image → (size, size, 3) uint8; RequestRejected(422) naming the item."""
    try:
        raw = base64.b64decode(item.image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestRejected(422, f"items[{index}].image: not valid base64 ({exc})") from None
    try:
        return load_pixels(raw, size, max_pixels)
    except ImageTooLarge as exc:
        raise RequestRejected(422, f"items[{index}].image: {exc}, above serve.max_image_pixels={max_pixels} "
                                   "(decompression bomb?); downscale it") from None
    except ImageError as exc:
        raise RequestRejected(422, f"items[{index}].image: {exc}") from None


def decode_items(items: list[Item], size: int, settings: ServeSettings, pool: ThreadPoolExecutor) -> np.ndarray:
    """Every item decoded in `pool`; all failing items are named in one 422."""

    def attempt(pair: tuple[int, Item]) -> np.ndarray | RequestRejected:
        try:
            return decode_item(pair[0], pair[1], size, settings.max_image_pixels)
        except RequestRejected as exc:
            return exc

    outcomes = list(pool.map(attempt, enumerate(items)))
    errors = [o.detail for o in outcomes if isinstance(o, RequestRejected)]
    if errors:
        more = f"; … and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        raise RequestRejected(422, "; ".join(errors[:MAX_LISTED]) + more)
    return np.stack(outcomes)  # type: ignore[arg-type]


def _bearer_guard(token: str | None) -> Callable[..., None]:
    expected = token.encode() if token else b""

    def guard(authorization: str | None = Header(default=None)) -> None:
        if token is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the token matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, f"missing or wrong bearer token: send 'Authorization: Bearer <token>' "
                                     f"(the token of {TOKEN_ENV} or serve.token)",
                                headers={"WWW-Authenticate": "Bearer"})

    return guard


def create_app(params: dict[str, Any], *, poll_seconds: float | None = None, device: str | None = None) -> Any:
    """The FastAPI app: loads the base in service (deltapatch.registry.bases; the local base.weights
    before any base version) and its patches at start-up."""
    settings = serve_settings(params)
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
    batcher = ForwardBatcher(predictor, settings.batch_images, settings.group_from)
    sync = ChampionSync(params, predictor, dev, on_swap=lambda fresh: setattr(batcher, "predictor", fresh))
    sync.refresh()
    pool = ThreadPoolExecutor(max_workers=settings.decode_threads, thread_name_prefix="deltapatch-decode")
    authorized = [Depends(_bearer_guard(serve_token(settings)))]

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
    app.state.sync = sync
    app.state.predictor = sync.predictor

    def swapped(fresh: Predictor) -> None:
        batcher.predictor = fresh
        app.state.predictor = fresh

    sync.on_swap = swapped
    app.state.batcher = batcher
    app.state.settings = settings

    @app.exception_handler(RequestRejected)
    async def rejected(_: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        limits = {k: v for k, v in asdict(settings).items() if k != "token"}
        return {"status": "ok", "base_fingerprint": sync.predictor.fingerprint, "base_version": sync.base_version,
                "tasks": sync.served(),
                "registry_error": sync.last_error, "limits": limits, "auth": serve_token(settings) is not None}

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
        parsed = parse_request(await read_body(request, settings.max_body_bytes), settings)
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
        images = await run_in_threadpool(decode_items, parsed.items, predictor.input_size, settings, pool)
        try:  # shared with the requests queued at the same time (deltapatch/batching.py)
            results = await asyncio.wrap_future(batcher.submit(images, names, predictor))
        except DeltapatchError as exc:  # e.g. a task whose champion was removed since the check
            raise RequestRejected(409, str(exc)) from None
        return JSONResponse({"results": results})

    return app


def run(params: dict[str, Any], host: str | None = None, port: int | None = None) -> None:
    """Serve with uvicorn (blocking). A non-loopback `host` needs a token (see check_exposure)."""
    settings = registry_settings(params)
    host = host or settings.serve_host
    check_exposure(host, serve_settings(params))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(params)
    uvicorn.run(app, host=host, port=int(port or settings.serve_port), log_level="info")
