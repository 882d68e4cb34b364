"""`deltapatch doctor`: the first command to run when something looks off."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deltapatch.cli.errors import user_errors

console = Console()
STYLE = {"ok": "green", "FAIL": "bold red", "-": "dim"}


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)


@user_errors
def doctor() -> None:
    """Check the project: params, base model, DVC remote, stack, registry, Prefect, CUDA.

    Exits 1 when something is wrong, with the fix for each failing row.
    """
    from deltapatch.doctor import FAIL, run_checks

    checks = run_checks()
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for check in checks:
        style = STYLE.get(check.status, "")
        table.add_row(check.name, f"[{style}]{check.status}[/]", escape(check.detail))
    console.print(table)
    failed = [c for c in checks if c.status == FAIL]
    for check in failed:
        console.print(f"[bold]→ {check.name}:[/] {escape(check.fix)}")
    if failed:
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")
