"""Turn library errors into clear lines and an exit code instead of a traceback, and keep the
libraries' INFO logging out of the output unless ``deltapatch --verbose``.

Every error ends with one line that says what to do: the error's own `hint` when it has one, else a
pointer to `deltapatch doctor`, which checks the whole project and names the fix.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape

from deltapatch.telemetry import QUIETED_MARKER

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True)

DOCTOR_HINT = "run `deltapatch doctor` to check the project; it names the fix for each problem"
# Environment switches that quiet MLflow/Prefect in this process (read when they are imported).
# Prefect's own logger levels stay as they are: its API handler sends the run's logs to the UI.
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
}
OWN_CODE = (str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "flows"))

_verbose = False


def set_verbosity(verbose: bool) -> None:
    """Called once by the `deltapatch` callback, before any command imports MLflow or Prefect."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    quieted = {key for key in QUIET_ENV if key not in os.environ}  # the user's own settings win
    os.environ.update({key: QUIET_ENV[key] for key in quieted})
    quieted |= set(filter(None, os.environ.get(QUIETED_MARKER, "").split(",")))
    os.environ[QUIETED_MARKER] = ",".join(sorted(quieted))
    for name in ("alembic", "mlflow", "httpx", "urllib3", "dvc"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.showwarning = _library_warnings_hidden(warnings.showwarning)


def _library_warnings_hidden(show: Callable[..., None]) -> Callable[..., None]:
    """Libraries' warnings (MLflow's type-hint advice, deprecations) are for their developers; ours stay.
    (A filter would not do: MLflow installs its own warning filters when imported, after ours.)"""

    def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "-packages" + os.sep in filename:
            return
        show(message, category, filename, lineno, file, line)

    return showwarning


class _OwnRunLines(logging.Filter):
    """Prefect's console in quiet mode: the run's lines that deltapatch's flows log (ingested, epochs,
    gate, …); not the engine's chatter or its tracebacks — the command reports the outcome itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or record.pathname.startswith(OWN_CODE)


def quiet_prefect_console() -> None:
    """Call once Prefect is imported (it sets up its logging then), before running a flow here."""
    if _verbose:
        return
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.addFilter(_OwnRunLines())


def is_verbose() -> bool:
    return _verbose


def print_error(exc: BaseException) -> None:
    """`error: <message>` then the one line of what to do."""
    from deltapatch.errors import DeltapatchError

    # soft_wrap: no line breaks inserted into paths and commands (the terminal wraps them for display)
    if isinstance(exc, DeltapatchError):
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        err_console.print(f"[bold]→[/] {escape(exc.hint or DOCTOR_HINT)}", soft_wrap=True)
        return
    first = (str(exc).strip().splitlines() or [""])[0]
    err_console.print(f"[bold red]error:[/] {type(exc).__name__}: {escape(first)}", soft_wrap=True)
    err_console.print("[bold]→[/] an unexpected failure: rerun with `deltapatch --verbose ...` for the full "
                      "traceback, and run `deltapatch doctor`", soft_wrap=True)


def user_errors(func: F) -> F:
    """Decorator for commands: a `DeltapatchError` (or ConfigError) prints its message and what to do,
    exits 2; any other exception prints one line (the traceback only with --verbose), exits 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deltapatch.errors import DeltapatchError

        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except DeltapatchError as exc:
            print_error(exc)
            raise typer.Exit(2) from None
        except Exception as exc:
            if _verbose:
                raise
            print_error(exc)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
