"""Surviving faults: the rules, in one place, for a worker that dies and a server that restarts.

- **A dead worker.** Training runs send a Prefect heartbeat every ``faults.heartbeat_seconds``
  (:func:`training_run_env`, set on the training deployment so that every worker's runs carry it);
  the stack's automation (:mod:`deltapatch.automations`) marks a run Crashed after
  ``faults.zombie_after_seconds`` without one. The parent then starts a new training run
  (:mod:`deltapatch.pool`), which resumes from the last epoch checkpoint in ``faults.checkpoint_dir``.
- **A server that restarts.** Steps that talk to MLflow ride the outage out (:func:`ride_out`:
  back-off over ``faults.outage_window_s``); Prefect's own clients get enough retries for the same
  window (:func:`prefect_client_retries`), and the parent's wait on a training run tolerates it.
- **Work never done twice.** A finished training is identified by :func:`training_key` (task, data
  content, training recipe, base fingerprint): the flows cache it under that key, and checkpoints are
  named by it, so a checkpoint is only ever resumed by the same training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from deltapatch.config import ConfigError, resolve_path, section
from deltapatch.errors import DeltapatchError, RegistryUnreachable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Prefect refuses heartbeat frequencies below this (prefect.settings FlowsSettings, ge=30).
MIN_HEARTBEAT_SECONDS = 30
# Back-off between attempts: doubling from FIRST_DELAY_S, never longer than MAX_DELAY_S (a server that
# is back is noticed within MAX_DELAY_S; a failed attempt against a down server costs milliseconds).
FIRST_DELAY_S = 2.0
MAX_DELAY_S = 8.0


@dataclass
class FaultSettings:
    """params.yaml `faults:` section (docs/orchestration.md, "Faults").

    heartbeat_seconds: training runs send a Prefect heartbeat this often (Prefect's minimum: 30).
    zombie_after_seconds: a training run without a heartbeat for this long is marked Crashed by the
        stack's automation (more than one heartbeat period, so a late heartbeat is not a death).
    outage_window_s: steps that talk to MLflow or Prefect retry with back-off for this long (a server
        restart takes 20–30 s here).
    train_attempts: training runs started for one arrival before it fails (a crashed run → a new one).
    queue_timeout_s: how long a training run may wait for a worker of the pool before it is cancelled.
    run_timeout_s: how long a training run may run (alive, heartbeating) before it is cancelled.
    poll_seconds: how often the parent reads the state of its training run.
    checkpoint_dir: epoch checkpoints; relative to the project. A run resumes only from a checkpoint
        it can read: with GPU workers on several machines, point it at a folder every one of them mounts.
    """

    heartbeat_seconds: int = 30
    zombie_after_seconds: int = 90
    outage_window_s: float = 120.0
    train_attempts: int = 3
    queue_timeout_s: float = 3600.0
    run_timeout_s: float = 21600.0
    poll_seconds: float = 2.0
    checkpoint_dir: str = ".deltapatch/checkpoints"

    def __post_init__(self) -> None:
        if int(self.heartbeat_seconds) < MIN_HEARTBEAT_SECONDS:
            raise ConfigError(f"params.yaml: faults.heartbeat_seconds is {self.heartbeat_seconds}; Prefect's minimum "
                              f"is {MIN_HEARTBEAT_SECONDS}")
        if int(self.zombie_after_seconds) <= int(self.heartbeat_seconds):
            raise ConfigError(f"params.yaml: faults.zombie_after_seconds ({self.zombie_after_seconds}) must exceed "
                              f"faults.heartbeat_seconds ({self.heartbeat_seconds}), or every live run looks dead "
                              "between two heartbeats")
        if int(self.train_attempts) < 1:
            raise ConfigError("params.yaml: faults.train_attempts must be at least 1")


def fault_settings(params: dict[str, Any]) -> FaultSettings:
    return section(params, "faults", FaultSettings)


# ------------------------------------------------------------------------------------ riding out


def backoff_delays(window_s: float) -> Iterator[float]:
    """Delays 2, 4, 8, 8, … s whose sum first reaches `window_s` (nothing for a window ≤ 0)."""
    waited, delay = 0.0, FIRST_DELAY_S
    while waited < window_s:
        step = min(delay, MAX_DELAY_S)
        yield step
        waited += step
        delay *= 2


def prefect_client_retries(window_s: float) -> int:
    """PREFECT_CLIENT_MAX_RETRIES that makes Prefect's clients ride out a `window_s` outage: they
    wait 2**n s before retry n (client/base.py), so n retries cover 2**(n+1) - 2 seconds."""
    retries = 1
    while 2 ** (retries + 1) - 2 < window_s:
        retries += 1
    return max(retries, 5)  # never fewer than Prefect's own default


def is_outage(exc: BaseException) -> bool:
    """A failure a server restart explains: the registry unreachable (:class:`RegistryUnreachable`), a
    refused or dropped connection, an HTTP 5xx. Bugs and refusals (4xx, a registry that refuses a
    promotion, bad input) fail the same way again: not retried."""
    if isinstance(exc, DeltapatchError):
        return isinstance(exc, RegistryUnreachable)
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code in (408, 429)
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def ride_out(call: Callable[[], T], params: dict[str, Any], what: str,
             say: Callable[[str], None] | None = None, window_s: float | None = None) -> T:
    """`call()`, retried with back-off while it fails with an outage (:func:`is_outage`), for up to
    ``faults.outage_window_s``; then the last error is raised, saying how long it was tried."""
    window = fault_settings(params).outage_window_s if window_s is None else window_s
    say = say or log.warning
    started = time.monotonic()
    delays = backoff_delays(window)
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            delay = next(delays, None)
            elapsed = time.monotonic() - started
            if delay is None:
                if isinstance(exc, DeltapatchError):  # keep the type and hint, say how long it was tried
                    exc.args = (f"{exc} (still failing after {elapsed:.0f} s of retries; faults.outage_window_s "
                                f"= {window:.0f})", *exc.args[1:])
                raise
            say(f"{what}: {_first_line(exc)}; retrying in {delay:.0f} s ({elapsed:.0f} of {window:.0f} s "
                "outage window used)")
            time.sleep(delay)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- training identity


def training_key(params: dict[str, Any], task: str, manifest_sha256: str, epochs: int | None = None) -> str:
    """Identity of one training: task, data content, recipe (train + delta + seed + base input
    settings, the epochs asked for) and base fingerprint. Equal keys → the same patch would come out."""
    recipe = {
        "task": task,
        "data": manifest_sha256,
        "epochs": epochs,
        "seed": params.get("seed", 0),
        "train": {k: v for k, v in (params.get("train") or {}).items() if k not in ("device", "amp", "threads")},
        "delta": params.get("delta") or {},
        "base_input": {k: (params.get("base") or {}).get(k) for k in ("input_size", "mean", "std")},
        "base": base_fingerprint(params),
    }
    blob = json.dumps(recipe, sort_keys=True, default=str).encode()
    return "train-" + hashlib.sha256(blob).hexdigest()[:32]


_fingerprints: dict[tuple[str, int, int], str] = {}


def base_fingerprint(params: dict[str, Any]) -> str:
    """The base model's fingerprint (its state dict), cached per weights file, size and mtime."""
    # The CLI's `stack` commands import this module and must not load torch:
    from deltapatch.fingerprint import fingerprint  # lazy: imports torch
    from deltapatch.models.base import (  # lazy: imports torch
        base_settings,
        base_weights_path,
        read_base_state,
    )
    from deltapatch.models.pretrain import missing_base_error  # lazy: imports torch

    weights = base_weights_path(params)
    try:
        stat = weights.stat()
    except OSError:
        raise missing_base_error(params, "nothing was trained") from None
    cache_key = (str(weights.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _fingerprints:
        _fingerprints[cache_key] = fingerprint(read_base_state(weights, base_settings(params)))
    return _fingerprints[cache_key]


def checkpoint_dir(params: dict[str, Any]) -> Path:
    """``faults.checkpoint_dir`` (relative to the project)."""
    return resolve_path(params, fault_settings(params).checkpoint_dir)


# ----------------------------------------------------------------------------------- environment


def training_run_env(params: dict[str, Any]) -> dict[str, str]:
    """Environment of every training flow run (the deployment's job variables, so that a worker on
    any machine applies it): heartbeats on, and Prefect clients that ride out a server restart."""
    settings = fault_settings(params)
    return {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(int(settings.heartbeat_seconds)),
            **prefect_client_env(params)}


def prefect_client_env(params: dict[str, Any]) -> dict[str, str]:
    """PREFECT_CLIENT_MAX_RETRIES for a client that must ride out ``faults.outage_window_s``."""
    return {"PREFECT_CLIENT_MAX_RETRIES": str(prefect_client_retries(fault_settings(params).outage_window_s))}
