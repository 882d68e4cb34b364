"""CLI of task ingestion and data versioning: ``deltapatch ingest`` and ``deltapatch data …``.

Commands work on the project found from the current folder (the one holding params.yaml), like git
and dvc. Library imports happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from deltapatch.cli.errors import user_errors

console = Console()

data_app = typer.Typer(
    name="data",
    help="Task data under DVC: set up the project, list data versions, check one out.",
    no_args_is_help=True,
)


def _params() -> dict[str, Any]:
    from deltapatch.config import load_params

    return load_params()


@user_errors
def ingest_command(
    path: Annotated[
        Path, typer.Argument(help="Folder (<root>/<class>/<image>) or .zip/.tar/.tar.gz of one.")
    ],
    task: Annotated[
        str | None,
        typer.Option(
            "--task", "-t", help="Task name (default: task.yaml's name, else the folder/archive name)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Validate a new task dataset, normalise it into data/tasks/<task>/ and version it with DVC.

    A rejected input is kept in data/quarantine/ with reason.txt; exit status 2.
    """
    from deltapatch.data.ingest import ingest

    result = ingest(path, _params(), task=task)
    if as_json:
        console.print_json(json.dumps(_result_dict(result)))
        return
    _print_result(result)


def _result_dict(result: Any) -> dict[str, Any]:
    """IngestResult → JSON-safe dict (paths as strings, data version in its dict form)."""
    return {
        "task": result.task,
        "status": result.status,
        "task_dir": str(result.task_dir),
        "manifest_sha256": result.manifest_sha256,
        "n_images": result.n_images,
        "classes": result.classes,
        "skipped": [{"path": b.path, "reason": b.reason} for b in result.skipped],
        "duplicates": [
            {
                "sha256": d.sha256,
                "sources": list(d.sources),
                "classes": list(d.classes),
                "splits": list(d.splits),
            }
            for d in result.duplicates
        ],
        "data_version": result.data_version.as_dict() if result.data_version else None,
        "previous_version": result.previous_version.as_dict() if result.previous_version else None,
        "duplicate_of": result.duplicate_of,
        "skipped_quarantine": str(result.skipped_quarantine) if result.skipped_quarantine else None,
        "warnings": result.warnings,
    }


def _print_result(result: Any) -> None:
    counts = ", ".join(f"{split} {n}" for split, n in result.n_images.items())
    if result.status == "unchanged":
        same = "" if result.duplicate_of == result.task else f" as task '{result.duplicate_of}'"
        console.print(
            f"[yellow]unchanged[/]: this content is already ingested{same} (duplicate, nothing written)"
        )
    else:
        label = "new task" if result.status == "new" else "new data version of"
        console.print(f"[green]{label}[/] '{result.task}': {len(result.classes)} classes, {counts}")
        if result.previous_version:
            console.print(f"  previous version: {result.previous_version}")
    console.print(f"  data version: [bold]{result.data_version}[/]")
    console.print(f"  folder: {escape(str(result.task_dir))}")
    if result.skipped:
        kept = f" (copies in {escape(str(result.skipped_quarantine))})" if result.skipped_quarantine else ""
        console.print(f"[yellow]skipped {len(result.skipped)} bad file(s)[/]{kept}:")
        for bad in result.skipped[:10]:
            console.print(f"  {escape(bad.path)}: {escape(bad.reason)}")
    for dup in result.duplicates:
        where = (
            "across splits" if dup.across_splits else "across classes" if dup.across_classes else "repeated"
        )
        console.print(f"[yellow]duplicate images ({where})[/]: {escape(', '.join(dup.sources))}")
    for warning in result.warnings:
        console.print(f"[yellow]warning[/]: {escape(warning)}")


@data_app.command("init")
@user_errors
def init_command() -> None:
    """Make the project a git + DVC repository with data/ tracked by data.dvc (idempotent)."""
    from deltapatch.config import project_root
    from deltapatch.data.versioning import ensure_project_repo, list_versions

    params = _params()
    ensure_project_repo(project_root(params), params)
    versions = list_versions(params)
    console.print(f"project ready at {project_root(params)} ({len(versions)} data.dvc commit(s))")


@data_app.command("versions")
@user_errors
def versions_command(
    task: Annotated[str | None, typer.Argument(help="Only this task's versions.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """List data versions (newest first) from the git history of data.dvc."""
    from deltapatch.data.versioning import list_versions

    versions = list_versions(_params(), task)
    if as_json:
        console.print_json(json.dumps([v.as_dict() | {"committed_at": v.committed_at} for v in versions]))
        return
    if not versions:
        console.print("no data versions yet: run `deltapatch ingest PATH`")
        return
    # Plain lines, not a table: the ids must stay whole to be copied into `data checkout`.
    for v in versions:
        console.print(f"{v} {v.task or '-':<20} {v.committed_at}", soft_wrap=True, highlight=False)


@data_app.command("checkout")
@user_errors
def checkout_command(
    rev: Annotated[str, typer.Argument(help="git revision, or a data version id from `data versions`.")],
) -> None:
    """Restore data/ as it was at REV (`git checkout REV -- data.dvc && dvc checkout`); HEAD = latest."""
    from deltapatch.config import project_root
    from deltapatch.data.versioning import checkout, git

    params = _params()
    version = checkout(params, rev)
    console.print(f"data/ restored to {version} ({version.task or 'no task'})", highlight=False)
    if version.git_commit != git(project_root(params), "rev-parse", "HEAD").strip():
        console.print(
            "data.dvc now differs from HEAD; return to the latest data with `deltapatch data checkout HEAD`"
        )


def register(app: typer.Typer) -> None:
    """Add `ingest` and the `data` sub-app to the top-level app."""
    app.command("ingest")(ingest_command)
    app.add_typer(data_app, name="data")
