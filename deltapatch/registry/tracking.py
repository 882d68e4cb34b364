"""Where the patch registry lives — resolved in ONE place for every entry point.

    1. ``MLFLOW_TRACKING_URI`` when set: that server (or store) only, nothing local;
    2. else the running local stack's MLflow server (``.deltapatch/stack/stack.json`` → ``mlflow_url``,
       used only if it answers ``/health``);
    3. else the same store that server serves, opened directly: ``.deltapatch/mlflow.db`` with its
       proxied artifacts in ``.deltapatch/mlartifacts`` (see :mod:`deltapatch.registry.store`).

2 and 3 are one store: a patch registered with the stack down is there once it is up, and back.
This module imports no MLflow at module level (the CLI stays fast); :func:`configure` does.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltapatch.config import ConfigError, section, state_dir
from deltapatch.errors import RegistryError, RegistryUnreachable
from deltapatch.registry import store

STACK_FILE = Path("stack") / "stack.json"
SQLITE_DB = store.SQLITE_DB
ARTIFACTS_DIR = store.ARTIFACTS_DIR


@dataclass
class RegistrySettings:
    """params.yaml `registry:` section."""

    model_prefix: str = "deltapatch-"
    experiment: str = "deltapatch"
    champion_alias: str = "champion"
    serve_host: str = "127.0.0.1"
    serve_port: int = 8765
    poll_seconds: float = 5.0
    retries: int = 3
    retry_delay_s: float = 1.0
    http_timeout_s: int = 20
    lock_timeout_s: float = 120.0
    page_size: int = 1000  # registry listings are read page by page, this many per request (MLflow's max: 1000)

    def __post_init__(self) -> None:
        if not 1 <= int(self.page_size) <= 1000:
            raise ConfigError(f"params.yaml: registry.page_size must be 1-1000 (MLflow's limit), got {self.page_size!r}")

    def model_name(self, task: str) -> str:
        return f"{self.model_prefix}{task}"

    @property
    def base_model_name(self) -> str:
        return f"{self.model_prefix}base"


def registry_settings(params: dict[str, Any]) -> RegistrySettings:
    return section(params, "registry", RegistrySettings)


def _health_ok(url: str, timeout: float = 1.5) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def stack_mlflow_url(params: dict[str, Any]) -> str | None:
    """The MLflow URL of the running local stack, or None (no state file, or it does not answer)."""
    path = state_dir(params) / STACK_FILE
    if not path.is_file():
        return None
    try:
        url = json.loads(path.read_text()).get("mlflow_url")
    except (json.JSONDecodeError, OSError, AttributeError):
        return None
    return url if isinstance(url, str) and url and _health_ok(url) else None


def local_store(params: dict[str, Any]) -> tuple[str, Path]:
    """(sqlite URI, artifact folder) of the project's one store (served by the stack's MLflow too)."""
    found = store.project_store(state_dir(params))
    return found.uri, found.artifacts


def external_registry() -> str | None:
    """MLFLOW_TRACKING_URI when the user set it: that registry only, nothing local (no store file
    opened, no MLflow server started by the stack)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None


def resolve_tracking_uri(params: dict[str, Any]) -> str:
    """The tracking (and registry) URI every deltapatch entry point uses."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    found = external_registry() or stack_mlflow_url(params)
    if found:
        return found
    if (params.get("stack") or {}).get("database") == "postgres":
        # The registry lives in the stack's PostgreSQL cluster; the sqlite file would be another store.
        raise RegistryUnreachable("this project's registry is in the stack's PostgreSQL database "
                                  "(stack.database: postgres), and the stack's MLflow server is not running",
                                  hint="start it with `deltapatch stack up`")
    return local_store(params)[0]


def uses_project_store(params: dict[str, Any]) -> bool:
    """True unless MLFLOW_TRACKING_URI names another registry (then nothing local is used)."""
    return external_registry() is None


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, settings: RegistrySettings) -> None:
    """For a server URI: retry `/health`, then fail with a clear message."""
    if not is_http(uri):
        return
    for attempt in range(1, max(1, settings.retries) + 1):
        if _health_ok(uri, timeout=min(5.0, float(settings.http_timeout_s))):
            return
        if attempt < settings.retries:
            time.sleep(settings.retry_delay_s * attempt)
    raise RegistryUnreachable(
        f"MLflow at {uri} is unreachable (no answer to /health after {settings.retries} tries)",
        hint="start it (`deltapatch stack up` repairs a partly running stack), fix MLFLOW_TRACKING_URI, or "
             "unset it to use the project's registry file",
    )


_configured: dict[str, str] = {}


def configure(params: dict[str, Any], check: bool = True) -> str:
    """Point this process's MLflow client at the resolved registry; ensure the experiment exists.

    Returns the URI. Safe to call repeatedly (cheap after the first call per URI).
    """
    settings = registry_settings(params)
    uri = resolve_tracking_uri(params)
    # Bound MLflow's own HTTP retries (its default backs off for minutes); ours are in check_reachable.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.http_timeout_s))
    if uses_project_store(params):
        check_single_store(params)
    if check:
        check_reachable(uri, settings)
    import mlflow  # lazy: mlflow takes seconds to import; the stack commands use only this module's settings and URLs

    store.register_scheme()
    store.init_store(uri)
    store.use_uri(uri)
    key = f"{uri}|{settings.experiment}"
    if key not in _configured:
        _configured[key] = ensure_experiment(uri, settings.experiment)
    mlflow.set_experiment(experiment_id=_configured[key])
    return uri


_single_store_checked: set[str] = set()


def check_single_store(params: dict[str, Any]) -> None:
    """Refuse (naming both files and `deltapatch registry migrate`) a project whose registry is split
    or still records local paths; checked once per process and project."""
    folder = state_dir(params)
    if str(folder) in _single_store_checked:
        return
    store.check_single_store(folder)
    _single_store_checked.add(str(folder))


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` on `uri`, created if missing: on a sqlite store with artifacts at
    `mlflow-artifacts:/<id>` as the store's server would (no local path in the metadata)."""
    from mlflow.exceptions import (
        MlflowException,  # lazy: mlflow takes seconds to import; the stack commands use only this module's settings and URLs
    )
    from mlflow.tracking import (
        MlflowClient,  # lazy: mlflow takes seconds to import; the stack commands use only this module's settings and URLs
    )

    client = MlflowClient(uri, uri)
    try:
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            if store.sqlite_path(uri) is not None:  # as its server would: artifacts at mlflow-artifacts:/<id>
                return store.sql_store(uri).create_experiment(name)
            return client.create_experiment(name)  # the server's own default (proxied when it serves them)
        except MlflowException:  # created concurrently
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id
    except MlflowException as exc:
        raise RegistryError(f"MLflow at {uri}: cannot open experiment '{name}' ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def experiment_id(params: dict[str, Any]) -> str:
    """The id of the deltapatch experiment on the configured registry."""
    uri = configure(params)
    return _configured[f"{uri}|{registry_settings(params).experiment}"]


def client(params: dict[str, Any]) -> Any:
    """An MlflowClient on the configured registry."""
    from mlflow.tracking import (
        MlflowClient,  # lazy: mlflow takes seconds to import; the stack commands use only this module's settings and URLs
    )

    uri = configure(params)
    return MlflowClient(uri, uri)


def ui_url(params: dict[str, Any]) -> str | None:
    """The MLflow UI base URL when a server is in use (env var or the local stack), else None."""
    uri = resolve_tracking_uri(params)
    return uri.rstrip("/") if is_http(uri) else None
