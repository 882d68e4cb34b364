"""Turn library errors into one clear line and exit code instead of a traceback."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True)


def user_errors(func: F) -> F:
    """Decorator for commands: a `DeltapatchError` (or ConfigError) prints its message, exits 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from deltapatch.errors import DeltapatchError

        try:
            return func(*args, **kwargs)
        except DeltapatchError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
