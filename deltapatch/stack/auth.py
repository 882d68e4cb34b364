"""Credentials of the stack's servers, required whenever they bind beyond loopback.

Each server keeps its own mechanism (no proxy of ours in front of them):

- Prefect: basic auth. The server checks ``PREFECT_SERVER_API_AUTH_STRING`` on every API route but
  ``/api/health`` and ``/api/ready`` (and, since 3.x, the events websocket's first message); every
  client sends ``PREFECT_API_AUTH_STRING`` (workers, served deployments, flow runs, the CLI).
- MLflow: the ``basic-auth`` app (``mlflow server --app-name basic-auth``). Its user store is
  ``<project>/.deltapatch/stack/mlflow-auth.db``; the admin user is created at its first start with
  the generated password (MLflow ships none), ``default_permission`` is NO_PERMISSIONS, so a user
  other than the admin sees nothing. Clients send ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``.
  ``/health``, the UI's static files and ``server-info`` answer without credentials (MLflow's choice:
  they carry no data).

The secrets are generated once by :func:`create_credentials` into ``credentials.json`` (mode 0600,
refused when group or others can read it). `stack up` on a host beyond loopback refuses to start
without them; on loopback they are used when the file exists. Another machine's worker reads a copy
of the file (`deltapatch worker start --credentials FILE`).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltapatch.access import is_loopback
from deltapatch.config import ConfigError, state_dir

CREDENTIALS_FILE = "credentials.json"
AUTH_CONFIG_FILE = "mlflow-auth.ini"
AUTH_DB_FILE = "mlflow-auth.db"
PREFECT_USER = "deltapatch"
MLFLOW_ADMIN = "deltapatch-admin"


@dataclass(frozen=True)
class StackCredentials:
    """The secrets of one stack: the Prefect auth string and MLflow's admin login and session key."""

    prefect_auth_string: str
    mlflow_username: str
    mlflow_password: str
    mlflow_secret_key: str

    def client_env(self) -> dict[str, str]:
        """What every client of the stack's servers sends."""
        return {"PREFECT_API_AUTH_STRING": self.prefect_auth_string,
                "MLFLOW_TRACKING_USERNAME": self.mlflow_username,
                "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}


def credentials_path(params: dict[str, Any]) -> Path:
    return state_dir(params) / "stack" / CREDENTIALS_FILE


def create_credentials(params: dict[str, Any], rotate: bool = False) -> Path:
    """Generate the stack's credentials into a file only this user can read; returns its path.

    An existing file is kept unless `rotate`: then new secrets replace it and MLflow's user store is
    removed, so that its next start creates the admin user with the new password (the stack must be
    down: the running servers still check the old secrets)."""
    path = credentials_path(params)
    if path.exists() and not rotate:
        load_credentials(path)  # still readable and private
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = StackCredentials(prefect_auth_string=f"{PREFECT_USER}:{secrets.token_urlsafe(32)}",
                             mlflow_username=MLFLOW_ADMIN, mlflow_password=secrets.token_urlsafe(32),
                             mlflow_secret_key=secrets.token_urlsafe(32))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from its first byte
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(fresh), out, indent=2)
        out.write("\n")
    tmp.replace(path)
    if rotate:
        (path.parent / AUTH_DB_FILE).unlink(missing_ok=True)
    return path


def load_credentials(path: Path) -> StackCredentials:
    """Read a credentials file; refused when others can read it or when it is not one of ours."""
    try:
        mode = path.stat().st_mode
        content = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such credentials file",
                          hint="run `deltapatch stack credentials` on the stack's machine and copy the file") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the stack's credentials ({exc})",
                          hint="create new ones with `deltapatch stack credentials --rotate` (stack down)") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: the stack's credentials are readable by other users (mode {oct(mode & 0o777)})",
                          hint=f"chmod 600 {path}")
    fields = set(StackCredentials.__dataclass_fields__)
    if not isinstance(content, dict) or set(content) != fields or not all(
            isinstance(v, str) and v for v in content.values()):
        raise ConfigError(f"{path}: not a deltapatch credentials file (expected the keys {sorted(fields)})",
                          hint="create new ones with `deltapatch stack credentials --rotate` (stack down)")
    return StackCredentials(**content)


def stack_credentials(params: dict[str, Any]) -> StackCredentials | None:
    """The project's credentials, None when it has none."""
    path = credentials_path(params)
    return load_credentials(path) if path.exists() else None


def require_credentials(params: dict[str, Any], host: str) -> StackCredentials | None:
    """The credentials the stack's servers need on `host`: refused beyond loopback without them."""
    found = stack_credentials(params)
    if found is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to start the stack on {host} without credentials: anyone who reaches its ports could "
            "start runs on the worker (code execution) or move the served patches",
            hint="run `deltapatch stack credentials` (generates them, mode 0600), or bind stack.host: 127.0.0.1")
    return found


def server_env(params: dict[str, Any], name: str, credentials: StackCredentials) -> dict[str, str]:
    """The variables that turn auth on in the server `name` (prefect, mlflow); empty for the others."""
    if name == "prefect":
        return {"PREFECT_SERVER_API_AUTH_STRING": credentials.prefect_auth_string}
    if name != "mlflow":
        return {}
    folder = credentials_path(params).parent
    config = folder / AUTH_CONFIG_FILE
    config.write_text("[mlflow]\n"
                      "default_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{(folder / AUTH_DB_FILE).resolve()}\n"
                      f"admin_username = {credentials.mlflow_username}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.mlflow_secret_key,
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": credentials.mlflow_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.mlflow_password}


def use_credentials(params: dict[str, Any]) -> None:
    """Make this process a client of the project's stack with its credentials (when it has any):
    Prefect's and MLflow's own clients, and deltapatch.access.prefect_headers, read them from the environment."""
    found = stack_credentials(params)
    if found is not None:
        os.environ.update(found.client_env())
