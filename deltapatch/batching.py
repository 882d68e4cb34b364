"""Dynamic batching for `deltapatch serve`: concurrent requests share one mixed-task forward.

    batcher = ForwardBatcher(predictor, max_images=128, max_queue=16)
    results = batcher.submit(images, tasks).result()   # from any thread; a Future per request
                                                       # (QueueFull when max_queue requests wait)

One thread owns the forwards. It takes the oldest waiting request and every request already queued
behind it, up to `max_images` images in all (a request is never split), runs ONE
``Predictor.predict`` over their concatenation (one mixed-task forward, or one forward per task for
batches of at least `group_from` images) and hands each request its own rows. Nothing waits
on purpose: while a forward runs, the requests that arrive meanwhile queue up and form the next
batch, so batching grows with the load and adds no latency when there is none. A request whose
tasks fail in the shared forward (e.g. a task unloaded since the request was checked) is retried
alone, so it cannot fail the requests it was batched with.

The queue is bounded: at most `max_queue` requests wait for a forward (the one being computed is not
counted); `submit` raises :class:`QueueFull` at once beyond that, so a burst cannot pile up unbounded
memory and latency behind the forward thread (serve answers 503 with ``Retry-After``).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deltapatch.errors import DeltapatchError
from deltapatch.registry.runtime import Predictor


class QueueFull(RuntimeError):
    """`max_queue` requests already wait for a forward: retry later (serve: 503 + Retry-After)."""


@dataclass
class _Job:
    images: np.ndarray
    tasks: list[str]
    predictor: Predictor  # the set in service when the request was accepted: it answers it (base swaps)
    future: Future[list[dict[str, Any]]] = field(default_factory=Future)


class ForwardBatcher:
    """Runs `predictor.predict` for queued requests in shared forwards of at most `max_images` images
    (1: one forward per request), with at most `max_queue` requests waiting (0: unbounded).
    Thread-safe; call `close()` to stop the forward thread."""

    def __init__(self, predictor: Predictor, max_images: int = 128, group_from: int = 0, max_queue: int = 0) -> None:
        self.predictor = predictor
        self.max_images = max(1, int(max_images))
        self.group_from = int(group_from)  # see Predictor.predict
        self.max_queue = max(0, int(max_queue))
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._held: _Job | None = None  # the job that did not fit into the previous batch
        self._waiting = 0  # submitted jobs not yet taken into a batch (the queue and `_held`)
        self._count_lock = threading.Lock()
        self.forwards = 0  # shared forwards run so far (for tests and logs)
        self._thread = threading.Thread(target=self._run, name="deltapatch-forward", daemon=True)
        self._thread.start()

    def submit(self, images: np.ndarray, tasks: list[str], predictor: Predictor | None = None) -> Future[list[dict[str, Any]]]:
        """`predictor`: the set that accepted the request (default: the current one) answers it.
        Raises QueueFull when `max_queue` requests already wait."""
        job = _Job(images, list(tasks), predictor or self.predictor)
        with self._count_lock:
            if self.max_queue and self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests already wait for a forward (max_queue={self.max_queue})")
            self._waiting += 1
        self._queue.put(job)
        return job.future

    @property
    def queued(self) -> int:
        """Requests waiting for a forward (not counting the one being computed)."""
        return self._waiting

    def full(self) -> bool:
        """True while a `submit` would raise QueueFull (a cheap check before costly work)."""
        return bool(self.max_queue) and self._waiting >= self.max_queue

    def _taken(self, n: int = 1) -> None:
        with self._count_lock:
            self._waiting -= n

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[_Job] | None:
        first = self._held or self._queue.get()
        self._held = None
        if first is None:
            return None
        self._taken()
        batch, size = [first], len(first.tasks)
        while size < self.max_images:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # closing: finish what was taken, then stop
                self._queue.put(None)
                break
            if size + len(job.tasks) > self.max_images or job.predictor is not first.predictor:
                self._held = job
                break
            batch.append(job)
            self._taken()
            size += len(job.tasks)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            self.forwards += 1
            if len(batch) == 1:
                self._alone(batch[0])
                continue
            try:
                rows = batch[0].predictor.predict(np.concatenate([j.images for j in batch]),
                                              [t for j in batch for t in j.tasks], group_from=self.group_from)
            except DeltapatchError:
                for job in batch:
                    self._alone(job)
                continue
            except Exception as exc:  # noqa: BLE001 (handed to every waiting request, never lost)
                for job in batch:
                    job.future.set_exception(exc)
                continue
            start = 0
            for job in batch:
                job.future.set_result(rows[start:start + len(job.tasks)])
                start += len(job.tasks)

    def _alone(self, job: _Job) -> None:
        try:
            job.future.set_result(job.predictor.predict(job.images, job.tasks, group_from=self.group_from))
        except Exception as exc:  # noqa: BLE001 (the request's own error, raised where it waits)
            job.future.set_exception(exc)
