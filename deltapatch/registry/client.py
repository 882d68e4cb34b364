"""Shared pieces of the patch registry: version-tag names, artifact paths, the MLflow client, the
per-name file lock, and the wrapper that turns MLflow/network failures into one-line RegistryErrors."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from deltapatch.config import state_dir
from deltapatch.errors import DeltapatchError, RegistryError, RegistryUnreachable
from deltapatch.registry.tracking import RegistrySettings, _first_line, configure

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

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


def registered_models(client: MlflowClient, prefix: str, page_size: int = 1000) -> Iterator[RegisteredModel]:
    """Every registered model whose name starts with `prefix` (all of them for ''), read page by page
    (`page_size` per request, registry.page_size; following ``page_token`` until the last page).

    MLflow answers at most one page per call (100 by default, 1000 at most): a reader that takes one
    page sees only part of a larger registry, and serving would unload the tasks it misses. The server
    filters on ``name LIKE '<prefix>%'`` (the prefix cut before any character that LIKE or the filter
    syntax treats specially, so the filter may only let more through), and the exact prefix is
    checked here again."""
    literal = re.split(r"[%_'\"\\]", prefix, maxsplit=1)[0]
    filter_string = f"name LIKE '{literal}%'" if literal else None
    token: str | None = None
    while True:
        page = client.search_registered_models(filter_string=filter_string, max_results=page_size, page_token=token)
        yield from (rm for rm in page if rm.name.startswith(prefix))
        token = page.token
        if not token:
            return


def model_versions(client: MlflowClient, name: str, page_size: int = 1000) -> list[ModelVersion]:
    """Every version of registered model `name`, read page by page (see :func:`registered_models`)."""
    if "'" in name and '"' in name:
        raise RegistryError(f"registered model name {name!r} holds both quote characters; it cannot be searched")
    quote = '"' if "'" in name else "'"
    out: list[ModelVersion] = []
    token: str | None = None
    while True:
        page = client.search_model_versions(f"name={quote}{name}{quote}", max_results=page_size, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


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
