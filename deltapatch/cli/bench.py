"""`deltapatch bench`: every method on every embedded patch task (docs/benchmark.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from deltapatch.cli.errors import user_errors

console = Console()


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.command("bench")(bench)


def _names(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also accept comma lists: ['a,b', 'c'] → ['a', 'b', 'c']."""
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


@user_errors
def bench(
    quick: bool = typer.Option(False, "--quick", help="Small, fast settings (params.yaml bench.quick); < 5 min on 2 cores."),
    tasks: list[str] = typer.Option(None, "--tasks", help="Tasks (repeatable or comma list; default bench.tasks)."),
    methods: list[str] = typer.Option(None, "--methods", help="Methods (repeatable or comma list; default bench.methods)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for bench.csv, bench.md, bench.png."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override the number of training epochs."),
) -> None:
    """Train every method on every patch task; write OUT/bench.csv, bench.md and bench.png."""
    from deltapatch.bench import run_bench
    from deltapatch.cli.core import need_base
    from deltapatch.config import load_params

    params = load_params()
    need_base(params)
    frame = run_bench(params, methods=_names(methods), tasks=_names(tasks), quick=quick, out_dir=out, epochs=epochs)
    means = frame.groupby("method", sort=False)[["patch_acc", "base_acc_change", "patch_pct"]].mean()
    console.print(means.to_string(float_format=lambda v: f"{v:.4f}"))
    console.print(f"wrote {out / 'bench.csv'}, {out / 'bench.md'}, {out / 'bench.png'}")
