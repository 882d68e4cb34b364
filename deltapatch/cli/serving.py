"""`deltapatch bench-serve`: load benchmark of the serving app on loopback (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from deltapatch.cli.errors import user_errors

console = Console()


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.command("bench-serve")(bench_serve)


@user_errors
def bench_serve(
    out: Path = typer.Option(Path("bench-results/serve"), "--out", help="Folder for bench-serve.csv/.md, status.csv, server.log."),
    clients: int = typer.Option(None, "--clients", min=1, help="Concurrent clients (default bench_serve.clients)."),
    seconds: float = typer.Option(None, "--seconds", min=1, help="Load duration (default bench_serve.seconds)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Images per good request (default bench_serve.batch)."),
    max_requests: int = typer.Option(None, "--max-requests", min=1, help="Hard bound on requests."),
    bad_fraction: float = typer.Option(None, "--bad-fraction", min=0.0, max=0.99, help="Share of bad requests."),
    attack_rate: float = typer.Option(None, "--attack-rate", min=0.0,
                                      help="--hostile: requests/s of each attacker (0: back to back)."),
    hostile: bool = typer.Option(False, "--hostile", help="Instead: a calm phase, then the same clients beside slow "
                                 "senders, item and pixel floods, text/plain POSTs and foreign Host headers."),
) -> None:
    """Serve the project's champions on 127.0.0.1 and load it: throughput, latency, status codes, a
    rollback half-way, peak memory, against the bare base-model forward ceiling (with --hostile: the
    well-behaved clients' throughput and /health's latency under attack, docs/security.md)."""
    # Lazy: torch, mlflow and the app load only when the command runs (keeps `deltapatch --help` fast).
    from deltapatch.bench_hostile import run_bench_hostile
    from deltapatch.bench_serve import run_bench_serve
    from deltapatch.config import load_params

    if hostile:
        metrics, attacks = run_bench_hostile(load_params(), out, clients=clients, seconds=seconds, batch=batch,
                                             max_requests=max_requests, attack_rate=attack_rate)
        console.print(metrics.to_string(index=False))
        console.print(attacks.to_string(index=False))
        console.print(f"wrote {out / 'bench-hostile.csv'}, {out / 'attacks.csv'}, {out / 'bench-hostile.md'}")
        return

    metrics, statuses = run_bench_serve(load_params(), out, clients=clients, seconds=seconds, batch=batch,
                                        max_requests=max_requests, bad_fraction=bad_fraction)
    console.print(metrics.to_string(index=False))
    console.print(statuses.to_string(index=False))
    console.print(f"wrote {out / 'bench-serve.csv'}, {out / 'status.csv'}, {out / 'bench-serve.md'}")
