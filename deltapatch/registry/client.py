"""Shared pieces of the patch registry: version-tag names, artifact paths, the MLflow client, the
per-name file lock, and the wrapper that turns MLflow/network failures into one-line RegistryErrors."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.config import state_dir
from deltapatch.errors import DeltapatchError, RegistryError, RegistryUnreachable
from deltapatch.registry.tracking import RegistrySettings, _first_line, configure

F = TypeVar("F", bound=Callable[..., Any])

MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_PATH = "model"
PATCH_ARTIFACT = "patch"

# version tags
T_TASK = "task"
T_KIND = "kind"
T_BASE_FP = "base_fingerprint"
T_BASE_VERSION = "base_version"
T_DATA_VERSION = "data_version"
T_GATE = "gate"
T_PATCH_ACC = "patch_acc"
T_BASE_CHECK = "base_check"
T_TRAINABLE_PCT = "trainable_pct"
T_PATCH_BYTES = "patch_bytes"
T_REGISTRATION = "registration"  # "complete" once artifacts are verified; "failed" if cleanup could not delete


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _wrap_errors(func: F) -> F:
    """MLflow / network failures → RegistryError with one clear line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DeltapatchError:
            raise
        except MlflowException as exc:
            if _unreachable(exc):
                raise RegistryUnreachable(f"MLflow did not answer {func.__name__}: {_first_line(exc)}") from None
            raise RegistryError(f"MLflow refused {func.__name__}: {_first_line(exc)}") from None
        except OSError as exc:
            kind = RegistryUnreachable if isinstance(exc, (ConnectionError, TimeoutError)) else RegistryError
            raise kind(f"MLflow I/O failed during {func.__name__} (server unreachable or artifact store not writable): {_first_line(exc)}") from None

    return wrapper  # type: ignore[return-value]


def _unreachable(exc: Exception) -> bool:
    """An MlflowException of the REST client that says the server did not answer (connection refused
    or dropped after MLflow's own retries, a timeout, an HTTP 5xx) rather than refused the request."""
    text = str(exc)
    return text.startswith("API request to") and ("failed with exception" in text or "timeout" in text
                                                   or re.search(r"failed with error code 5\d\d", text) is not None)


def _client(params: dict[str, Any]) -> MlflowClient:
    uri = configure(params)
    return MlflowClient(uri, uri)


def _lock(params: dict[str, Any], name: str, settings: RegistrySettings) -> contextlib.AbstractContextManager[None]:
    folder = state_dir(params) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"registry-{name}.lock"), timeout=settings.lock_timeout_s)

    @contextlib.contextmanager
    def held() -> Iterator[None]:
        try:
            with lock:
                yield
        except Timeout:
            raise RegistryError(
                f"another promotion/rollback of '{name}' holds {lock.lock_file} for over "
                f"{settings.lock_timeout_s:.0f} s; retry later (registry.lock_timeout_s)"
            ) from None

    return held()
