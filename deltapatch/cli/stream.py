"""`deltapatch stream`: the continual-learning stream report (docs/benchmark.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from deltapatch.cli.bench import _names
from deltapatch.cli.errors import user_errors

console = Console(soft_wrap=True)  # long paths and MLflow URIs stay on one line


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.command("stream")(stream)


@user_errors
def stream(
    quick: bool = typer.Option(False, "--quick", help="Small, fast settings (params.yaml stream.quick; target: < 5 min on 2 idle cores)."),
    tasks: list[str] = typer.Option(None, "--tasks", help="Tasks after the base task, in arrival order: built-in or ingested names (repeatable or comma list; default stream.tasks, else bench.tasks)."),
    strategies: list[str] = typer.Option(None, "--strategies", help="Strategies (repeatable or comma list; default stream.strategies)."),
    out: Path = typer.Option(Path("stream-results"), "--out", help="Folder for stream.csv, stream.md, stream.png."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override the number of training epochs per task."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Log to this MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the running stack's MLflow; none: no logging)."),
) -> None:
    """Every strategy learns the stream (base task, then each task in order); write OUT/stream.csv, .md, .png."""
    from deltapatch.config import load_params
    from deltapatch.stream import run_stream
    from deltapatch.stream.report import summary_lines, target_checks

    params = load_params()
    result = run_stream(params, strategies=_names(strategies), tasks=_names(tasks), quick=quick, out_dir=out,
                        epochs=epochs, tracking_uri=tracking_uri)
    console.print("strategy  ACC  BWT  FWT  final-base-acc  base-bit-identical  stored-MB  stored/base  train-s")
    for line in summary_lines(result):
        console.print("  ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in line))
    for target, verdict, measured in target_checks(result):
        console.print(f"{verdict:4}  {target}: {measured:.6g}")
    console.print(f"wrote {out / 'stream.csv'}, {out / 'stream.md'}, {out / 'stream.png'} in {result.wall_seconds:.0f} s")
    console.print(f"MLflow: {result.mlflow_run}" if result.mlflow_run else
                  "MLflow: not logged (no --tracking-uri, MLFLOW_TRACKING_URI or running stack)")
