"""CLI commands of this component (registered by deltapatch.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
