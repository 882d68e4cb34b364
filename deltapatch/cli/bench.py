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


def _shot_counts(values: list[str] | None) -> list[int] | None:
    """`--shots 5,10 --shots full` → [5, 10, 0]; a value that is neither a count nor 'full' is refused."""
    names = _names(values)
    if names is None:
        return None
    try:
        return [0 if name == "full" else int(name) for name in names]
    except ValueError:
        raise typer.BadParameter(f"--shots takes image counts per class or 'full', got {','.join(names)}") from None


@user_errors
def bench(
    quick: bool = typer.Option(False, "--quick", help="Small, fast settings (params.yaml bench.quick); < 5 min on 2 cores."),
    tasks: list[str] = typer.Option(None, "--tasks", help="Tasks (repeatable or comma list; default bench.tasks): "
                                    "built-in names, ingested task names, or paths to your own dataset "
                                    "(folder or archive, validated like `deltapatch ingest`, never written into data/)."),
    methods: list[str] = typer.Option(None, "--methods", help="Methods (repeatable or comma list; default bench.methods)."),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Folder for bench.csv, bench.md, bench.png."),
    epochs: int = typer.Option(None, "--epochs", min=1, help="Override the number of training epochs."),
    seeds: int = typer.Option(None, "--seeds", min=1, help="Runs per (method, task) with seeds seed, seed+1, … (default bench.seeds)."),
    resume: bool = typer.Option(False, "--resume", help="Keep the (method, task, seed) rows already in OUT/bench.csv; run the rest."),
    overrides: list[str] = typer.Option(None, "--set", help="Override a params.yaml value for this run, e.g. "
                                        "--set train.min_steps=0 (repeatable; ablations)."),
    shots: list[str] = typer.Option(None, "--shots", help="Few-shot runs: K training images per class (repeatable "
                                    "or comma list, 'full' = the whole training split), sampled per seed; val and "
                                    "test untouched (default bench.shots)."),
) -> None:
    """Train every method on every patch task; write OUT/bench.csv, bench.md and bench.png."""
    from deltapatch.bench import accuracy_table, run_bench
    from deltapatch.cli.core import need_base
    from deltapatch.config import apply_overrides, load_params

    params = apply_overrides(load_params(), overrides or [])
    need_base(params)
    frame = run_bench(params, methods=_names(methods), tasks=_names(tasks), quick=quick, out_dir=out, epochs=epochs,
                      seeds=seeds, resume=resume, shots=_shot_counts(shots))
    console.print(accuracy_table(frame).to_string(index=False))
    console.print(f"wrote {out / 'bench.csv'}, {out / 'bench.md'}, {out / 'bench.png'}")
