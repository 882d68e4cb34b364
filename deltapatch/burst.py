"""An arrival burst against a running stack: N datasets submitted within a few seconds; does every
arrival event start a `patch-task` run? (Issue 15: 20 arrivals in 10 s, 0 dropped events, on
PostgreSQL and on SQLite.)

Each arrival is a distinct task (``burst-00``, ``burst-01``, …) submitted with
:func:`deltapatch.inbox.submit` (copy into the inbox + ``deltapatch.task.arrived``), each from its
own thread at its due time (evenly spread over the burst). An event
*started a run* when the server holds a `patch-task` flow run for its inbox path (created by the
deployment's trigger); the figures also say how many of those reached Running and how many failed
or crashed within the observation window. The runs are not awaited to the end: twenty trainings
take long on a CPU, and what is measured is the event → run path (the server's database under a
burst of writes), not training. Stop the stack afterwards (`stack down` ends the runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltapatch import prefect_api
from deltapatch.data.builtin import write_imagefolder
from deltapatch.inbox import PATCH_TASK_DEPLOYMENT, submit
from deltapatch.stack import stack_settings, urls

BURST_TASK = "shapes"  # the embedded task every arrival copies (under its own task name)
BAD_STATES = ("FAILED", "CRASHED")


@dataclass
class BurstResult:
    """What one burst measured (seconds from the first submission)."""

    database: str
    arrivals: int
    submitted_in_s: float
    started: int = 0  # arrivals with a patch-task run
    running: int = 0  # of those, runs that reached Running (or a later state)
    failed: int = 0  # runs that ended Failed/Crashed within the window
    last_run_created_s: float | None = None  # when the last arrival's run appeared
    window_s: float = 0.0
    missing: list[str] = field(default_factory=list)  # arrivals without a run
    failures: list[str] = field(default_factory=list)  # "<run>: <state message>" of the failed runs

    @property
    def dropped(self) -> int:
        return self.arrivals - self.started

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dropped": self.dropped}


def write_sources(folder: Path, count: int, per_class: int = 12, image_size: int = 32) -> list[Path]:
    """`count` copies of the embedded task as ImageFolders (different seeds: different data)."""
    return [write_imagefolder(BURST_TASK, folder / f"src-{i:02d}", image_size, i, per_class) for i in range(count)]


def run_burst(params: dict[str, Any], sources: list[Path], within_s: float, window_s: float,
              say: Callable[[str], None] = lambda _m: None, until_running: bool = True) -> BurstResult:
    """Submit `sources` evenly spread over `within_s` seconds to the project's running stack; watch for
    `window_s` seconds after the first submission, or until every arrival has a run (that is running,
    with `until_running`)."""
    api = urls(params)["prefect_api_url"]
    deployment = prefect_api.deployment_id(api, PATCH_TASK_DEPLOYMENT)
    gap = within_s / max(1, len(sources))
    started = time.monotonic()

    def arrive(i: int) -> tuple[str, str]:
        # Each arrival on its own thread at its due time: one submission (a copy and a POST) takes
        # about a second on a loaded 2-core machine, so one after another would not fit in the burst.
        time.sleep(max(0.0, started + i * gap - time.monotonic()))
        task = f"burst-{i:02d}"
        return submit(params, sources[i], task)["path"], task

    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        paths = dict(pool.map(arrive, range(len(sources))))
    result = BurstResult(stack_settings(params).database, len(sources), round(time.monotonic() - started, 2))
    say(f"{len(sources)} arrivals submitted in {result.submitted_in_s:.1f} s")
    seen: dict[str, dict[str, Any]] = {}
    while True:
        found = prefect_api.runs_by_path(api, deployment)
        for path in paths:
            if path in found and path not in seen:
                seen[path] = found[path]
                result.last_run_created_s = round(time.monotonic() - started, 1)
            if path in found:
                seen[path] = found[path]
        states = [(run.get("state") or {}).get("type", "") for run in seen.values()]
        running = sum(1 for s in states if s not in ("SCHEDULED", "PENDING", ""))
        elapsed = time.monotonic() - started
        if (len(seen) == len(paths) and (running == len(paths) or not until_running)) or elapsed > window_s:
            break
        time.sleep(1.0)
    result.window_s = round(elapsed, 1)
    result.started, result.running = len(seen), running
    result.failed = sum(1 for s in states if s in BAD_STATES)
    result.failures = [f"{run['name']}: {(run.get('state') or {}).get('message', '')}"[:300] for run in seen.values()
                       if (run.get("state") or {}).get("type") in BAD_STATES]
    result.missing = sorted(paths[p] for p in paths if p not in seen)
    say(f"{result.started}/{result.arrivals} arrivals started a run ({result.running} running or past it, "
        f"{result.failed} failed) within {result.window_s:.0f} s")
    return result


def markdown_table(results: list[BurstResult]) -> str:
    lines = ["| database | arrivals | submitted in s | started a run | dropped | reached Running | failed | "
             "last run created at s | window s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.database} | {r.arrivals} | {r.submitted_in_s:.1f} | {r.started} | {r.dropped} | "
                     f"{r.running} | {r.failed} | {r.last_run_created_s if r.last_run_created_s is not None else '-'} | "
                     f"{r.window_s:.0f} |")
    return "\n".join(lines) + "\n"
