"""`deltapatch serve`: one HTTP service for the base model and every `champion` patch.

    GET  /health   → {"status": "ok", "base_fingerprint": ..., "tasks": {task: version}}
    GET  /tasks    → {"base": {...}, task: {"version", "classes", "patch_acc", "data_version"}, ...,
                      "refused": {task: reason}}
    POST /predict  {"items": [{"task": "shapes", "image": "<base64 PNG/JPEG>"}, ...]}
                   → {"results": [{"task", "version", "class", "class_index", "score", "scores"}, ...]}
                   (ONE mixed-batch forward for the whole request)
    POST /reload   → re-read the champion aliases now (also done every registry.poll_seconds)

A task whose `champion` alias moves (promotion or rollback) is reloaded by the background poll, so a
rollback takes effect without a restart. A patch whose base fingerprint differs from the running
base is refused (reported under "refused" in /tasks) and never served.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import shutil
import threading
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field

from deltapatch.errors import DeltapatchError

log = logging.getLogger("deltapatch.serve")


class Item(BaseModel):
    task: str = Field(description="task name, or 'base'")
    image: str = Field(description="base64-encoded PNG/JPEG image")


class PredictRequest(BaseModel):
    items: list[Item]


class ChampionSync:
    """Keeps a Predictor's patches equal to the registry's champion versions."""

    def __init__(self, params: dict[str, Any], predictor: Any) -> None:
        self.params = params
        self.predictor = predictor
        self.refused: dict[str, str] = {}
        self.last_error = ""
        self._sync_lock = threading.Lock()
        self._refused_versions: dict[str, int] = {}

    def refresh(self) -> dict[str, int]:
        """Load/replace/drop patches so they match the champions; returns {task: version} now served."""
        from deltapatch.registry.registry import champions, download_patch

        with self._sync_lock:
            try:
                wanted = champions(self.params)
                self.last_error = ""
            except DeltapatchError as exc:
                self.last_error = str(exc)
                log.warning("champion poll failed: %s", exc)
                return self.served()
            for task in list(self.predictor.patches):
                if task not in wanted:
                    self.predictor.remove_patch(task)
                    log.info("task %s has no champion any more; unloaded", task)
            for task, info in wanted.items():
                version = int(info["version"])
                loaded = self.predictor.patches.get(task)
                if loaded is not None and loaded.version == str(version):
                    continue
                if self._refused_versions.get(task) == version:
                    continue
                folder = None
                try:
                    folder = download_patch(self.params, task, version=version)
                    self.predictor.add_patch(folder, version=str(version), info=info)
                    self.refused.pop(task, None)
                    self._refused_versions.pop(task, None)
                    log.info("serving %s version %s", task, version)
                except DeltapatchError as exc:
                    self.refused[task] = f"version {version}: {exc}"
                    self._refused_versions[task] = version
                    log.error("refused %s version %s: %s", task, version, exc)
                finally:
                    if folder is not None:  # the tensors are in memory now
                        shutil.rmtree(folder.parents[1], ignore_errors=True)
            return self.served()

    def served(self) -> dict[str, int]:
        return {task: int(p.version) for task, p in self.predictor.patches.items()}


def create_app(params: dict[str, Any], *, poll_seconds: float | None = None, device: str | None = None) -> Any:
    """The FastAPI app: loads the local base (params.yaml) and the champion patches at start-up."""
    import asyncio

    import numpy as np
    from fastapi import FastAPI, HTTPException

    from deltapatch.config import section
    from deltapatch.models.base import load_base
    from deltapatch.registry.runtime import Predictor, decode_image
    from deltapatch.registry.tracking import configure, registry_settings
    from deltapatch.train import TrainSettings, resolve_device

    settings = registry_settings(params)
    interval = settings.poll_seconds if poll_seconds is None else float(poll_seconds)
    configure(params)
    dev = resolve_device(device or section(params, "train", TrainSettings).device)
    predictor = Predictor(load_base(params, dev))
    sync = ChampionSync(params, predictor)
    sync.refresh()

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

    app = FastAPI(title="deltapatch", version="1", lifespan=lifespan)
    app.state.sync = sync
    app.state.predictor = predictor

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "base_fingerprint": predictor.fingerprint, "tasks": sync.served(),
                "registry_error": sync.last_error}

    @app.get("/tasks")
    def tasks() -> dict[str, Any]:
        out: dict[str, Any] = {"base": {"version": "", "classes": predictor.class_names("base"),
                                        "fingerprint": predictor.fingerprint}}
        for name, patch in list(predictor.patches.items()):
            out[name] = {"version": int(patch.version), "classes": list(patch.meta.class_names),
                         "patch_acc": patch.info.get("patch_acc"), "data_version": patch.info.get("data_version", "")}
        out["refused"] = dict(sync.refused)
        return out

    @app.post("/reload")
    def reload() -> dict[str, Any]:
        return {"tasks": sync.refresh(), "refused": dict(sync.refused)}

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        if not request.items:
            return {"results": []}
        images, names = [], []
        for i, item in enumerate(request.items):
            try:
                raw = base64.b64decode(item.image, validate=True)
                images.append(decode_image(raw, predictor.input_size))
            except (binascii.Error, ValueError, DeltapatchError) as exc:
                raise HTTPException(422, f"items[{i}].image: not a base64 PNG/JPEG ({exc})") from None
            names.append(item.task)
        unknown = sorted({t for t in names if t != "base" and t not in predictor.patches})
        if unknown:
            raise HTTPException(404, f"no champion patch served for task(s) {unknown}; served: {predictor.tasks()}")
        try:
            results = predictor.predict(np.stack(images), names)
        except DeltapatchError as exc:  # e.g. a task unloaded between the check and the forward
            raise HTTPException(409, str(exc)) from None
        return {"results": results}

    return app


def run(params: dict[str, Any], host: str | None = None, port: int | None = None) -> None:
    """Serve with uvicorn (blocking)."""
    import uvicorn

    from deltapatch.registry.tracking import registry_settings

    settings = registry_settings(params)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(params)
    uvicorn.run(app, host=host or settings.serve_host, port=int(port or settings.serve_port), log_level="info")
