"""Training on the GPU work pool, from a parent flow: submit a run of the training deployment, wait for
it with bounded waits, and start a new run when one crashes.

Each attempt is a new flow run of the training deployment (``train-<task>``, then
``train-<task>-attempt-2``, …), which resumes from the last epoch checkpoint when its worker can read
``faults.checkpoint_dir``. An attempt ends:

- **Completed** → its result (the metrics and the patch files) is returned;
- **Crashed** (the zombie automation saw no heartbeat: its worker died) or **Failed** with an error a
  retry can fix → the next attempt, up to ``faults.train_attempts``;
- **Failed** with an error that fails the same way again (a bad configuration) or **Cancelled** by a
  user → raised at once;
- still waiting for a worker after ``faults.queue_timeout_s``, or running longer than
  ``faults.run_timeout_s`` → cancelled, and the arrival fails saying which bound it hit.

Nothing waits forever, and a Prefect server that restarts while the parent waits is ridden out for
``faults.outage_window_s``. This module only talks to Prefect through its client (the process's
Prefect settings: inside a flow run, that flow run's server).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled

from deltapatch.errors import DeltapatchError
from deltapatch.faults import FaultSettings, fault_settings, is_outage, ride_out
from deltapatch.step_results import TrainedPatch

Say = Callable[[str], None]


class TrainingRunError(DeltapatchError):
    """A training run on the pool did not produce a patch (crashed every attempt, timed out, cancelled)."""


@dataclass
class TrainingAttempt:
    """One training flow run of an arrival: how it ended and how long it took (submitted → end)."""

    attempt: int
    run_id: str
    run_name: str
    state: str
    seconds: float
    message: str = ""
    resumed_from_epoch: int = 0  # of a completed attempt: the checkpoint it started after (0: epoch 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PoolTraining:
    """The result of the completed attempt, and every attempt made."""

    trained: dict[str, Any]
    attempts: list[TrainingAttempt] = field(default_factory=list)


def run_name(task: str, attempt: int) -> str:
    return f"train-{task}" if attempt == 1 else f"train-{task}-attempt-{attempt}"


def train_on_pool(params: dict[str, Any], deployment: str, parameters: dict[str, Any], *, say: Say,
                  warn: Say | None = None, idempotency_prefix: str | None = None) -> PoolTraining:
    """Run `deployment` (e.g. ``train-patch/gpu``) with `parameters` (plus ``attempt``) until one attempt
    completes; see the module docstring for what ends an attempt and what is retried."""
    settings = fault_settings(params)
    warn = warn or say
    task = str(parameters.get("task_name", "task"))
    attempts: list[TrainingAttempt] = []
    for n in range(1, settings.train_attempts + 1):
        name = run_name(task, n)
        key = f"{idempotency_prefix}:{n}" if idempotency_prefix else None
        started = time.monotonic()
        submit = functools.partial(_submit, deployment, {**parameters, "attempt": n}, name, key)
        run_id = ride_out(submit, params, f"submitting {name}", say=warn)
        say(f"training run {name} (attempt {n} of {settings.train_attempts}) submitted to {deployment}: {run_id}")
        run = _wait(params, settings, run_id, name, say, warn)
        state = run.state
        attempt = TrainingAttempt(n, str(run_id), name, state.name if state else "?", round(time.monotonic() - started, 1),
                                  (state.message or "") if state else "")
        attempts.append(attempt)
        if state is not None and state.is_completed():
            trained = state.result()
            attempt.resumed_from_epoch = int(trained.get("resumed_from_epoch", 0))
            return PoolTraining(trained, attempts)
        _raise_if_final(state, name)
        if n < settings.train_attempts:
            warn(f"training run {name} ended {attempt.state} after {attempt.seconds:.0f} s ({attempt.message or 'no message'}); "
                 f"starting attempt {n + 1}, which resumes from the last epoch checkpoint if its worker can read "
                 f"faults.checkpoint_dir")
    last = attempts[-1]
    raise TrainingRunError(
        f"training of '{task}' failed {len(attempts)} time(s); the last run, {last.run_name}, ended {last.state}: "
        f"{last.message}", hint="see the training runs' logs in the Prefect UI; faults.train_attempts sets how many "
                                "runs are tried")


def _submit(deployment: str, parameters: dict[str, Any], name: str, idempotency_key: str | None) -> UUID:
    run = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=name,
                         idempotency_key=idempotency_key)
    assert isinstance(run, FlowRun)  # called from sync code, Prefect's sync/async API returns the run itself
    return run.id


def _wait(params: dict[str, Any], settings: FaultSettings, run_id: UUID, name: str, say: Say, warn: Say) -> Any:
    """Poll the run until it is final; bounded by the queue and run timeouts, tolerant of a Prefect
    outage up to ``faults.outage_window_s`` (then a retryable error)."""
    submitted = time.monotonic()
    running_since: float | None = None
    reported = ""
    with get_client(sync_client=True) as client:
        while True:
            try:  # an outage is ridden out like every other wait (faults.ride_out), then retryable
                run = ride_out(lambda: client.read_flow_run(run_id), params, f"reading {name} from the Prefect API",
                               warn, window_s=settings.outage_window_s)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                raise TrainingRunError(f"lost the Prefect API while waiting for {name} for longer than "
                                       f"faults.outage_window_s ({settings.outage_window_s:.0f} s)") from exc
            state = run.state
            if state is not None and state.is_final():
                return run
            kind = state.type.value if state else "?"
            if state is not None and state.is_running() and running_since is None:
                running_since = time.monotonic()
                say(f"{name} is running (waited {running_since - submitted:.0f} s for a worker)")
            if state is not None and kind != reported and kind in ("SCHEDULED", "PENDING", "PAUSED", "CANCELLING"):
                say(f"{name} is {state.name}")
            reported = kind
            now = time.monotonic()
            if running_since is None and now - submitted > settings.queue_timeout_s:
                _cancel(client, run_id, f"no worker started it within {settings.queue_timeout_s:.0f} s")
                raise TrainingRunError(
                    f"{name} waited {now - submitted:.0f} s for a worker of its pool (faults.queue_timeout_s); "
                    "cancelled", hint="start a worker (`deltapatch stack up` repairs the stack's; on a GPU machine "
                                      "`prefect worker start --pool gpu`), then submit the dataset again")
            if running_since is not None and now - running_since > settings.run_timeout_s:
                _cancel(client, run_id, f"ran longer than faults.run_timeout_s ({settings.run_timeout_s:.0f} s)")
                raise TrainingRunError(f"{name} ran {now - running_since:.0f} s, longer than faults.run_timeout_s; "
                                       "cancelled", hint="raise faults.run_timeout_s for long trainings")
            time.sleep(settings.poll_seconds)


def _cancel(client: Any, run_id: UUID, why: str) -> None:
    try:
        client.set_flow_run_state(run_id, Cancelled(message=f"cancelled by its parent: {why}"), force=True)
    except Exception:  # noqa: BLE001 — best effort: the error raised next says what happened
        pass


def _raise_if_final(state: Any, name: str) -> None:
    """Raise when another attempt cannot help: a user cancelled the run, or it failed with an error
    that fails the same way again (the training's own error, when Prefect kept it)."""
    if state is None:
        return
    if state.is_cancelled():
        raise TrainingRunError(f"{name} was cancelled: {state.message or ''}".rstrip(": "))
    if state.is_failed():
        try:
            state.result()
        except DeltapatchError as exc:
            if not exc.retryable:
                raise
        except Exception:  # noqa: BLE001 — not readable here, or any other error: another attempt may help
            pass


def pool_available(params: dict[str, Any], deployment: str) -> bool:
    """True when `deployment` exists and a worker of its pool is online; False when either is missing.
    A Prefect server that does not answer is waited for (``faults.outage_window_s``), not taken for
    "no pool": that would silently train here instead."""
    def check() -> bool:
        with get_client(sync_client=True) as client:
            try:
                found = client.read_deployment_by_name(deployment)
            except ObjectNotFound:
                return False
            workers = client.read_workers_for_work_pool(found.work_pool_name or "gpu")
        return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)

    try:
        return ride_out(check, params, "checking the gpu pool")
    except Exception as exc:
        if is_outage(exc):
            raise
        return False  # no usable Prefect API here (e.g. no server configured): train in-process


def training_note(trained: TrainedPatch, attempts: list[TrainingAttempt], reused: bool) -> str:
    """The "Training" paragraph of an arrival's report: reused, resumed after a crash, or restarted
    from epoch 1 because no checkpoint was reachable (first line: a one-line summary)."""
    if reused:
        return (f"Training: reused the finished training `{trained.training_key}` (same task, data, recipe "
                "and base): not trained again.")
    resumed, attempt = trained.resumed_from_epoch, trained.attempt
    if attempt <= 1 and not resumed:
        return f"Training: {trained.epochs_run} epochs in one run."
    if resumed:
        who = f"attempt {attempt}" if attempt > 1 else "a retry after a crash"
        lines = [f"Training: {who} resumed after epoch {resumed} from the checkpoint `{trained.checkpoint}`."]
    else:
        lines = [f"Training: attempt {attempt} **restarted from epoch 1**: no checkpoint of the earlier attempt was "
                 f"reachable at `{trained.checkpoint}` (faults.checkpoint_dir must be a folder every GPU "
                 "worker reaches)."]
    if attempts:
        lines += ["", "| attempt | training run | ended | seconds | note |", "|---|---|---|---|---|"]
        lines += [f"| {a.attempt} | `{a.run_name}` | {a.state} | {a.seconds:.0f} | {a.message.replace('|', '/')[:160]} |"
                  for a in attempts]
    return "\n".join(lines)
