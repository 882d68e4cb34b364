"""Core commands: pretrain, demo-data, train (one patch), fingerprint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from deltapatch.cli.errors import user_errors

console = Console()
err_console = Console(stderr=True)  # progress notes, so stdout stays the command's answer


def need_base(params: dict[str, Any]) -> None:
    """First step of every command that needs the base model: pre-train the embedded default now
    (progress bar), or stop — before any work — naming a missing user base file and the fix."""
    from deltapatch.models.pretrain import ensure_base

    ensure_base(params, progress=True, say=lambda message: err_console.print(f"[bold]base:[/] {message}"))


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("pretrain")(pretrain)
    app.command("demo-data")(demo_data)
    app.command("train")(train)
    app.command("fingerprint")(show_fingerprint)


@user_errors
def init(
    folder: Path = typer.Argument(..., help="Folder of the new project (created)."),
    arch: str = typer.Option("timm:tf_efficientnet_lite0", "--arch", help="The pre-trained CNN: timm:<model name>."),
    weights: str = typer.Option(None, "--weights", help="Its weights: a file (.safetensors, or a state dict saved "
                                "with torch.save), or package:<module>/<path>; default: the file an installed "
                                "package ships for --arch."),
    input_size: int = typer.Option(None, "--input-size", min=8, help="Input side in pixels (default: the model's "
                                   "pretrained config)."),
) -> None:
    """Start a project on your own pre-trained CNN: params.yaml, git + DVC, the local remote."""
    from deltapatch.project_init import describe, init_project  # lazy: imports torch and timm

    result = init_project(folder, arch, weights, input_size)
    console.print(f"project ready at {result.root}")
    for key, value in describe(result.base).items():
        console.print(f"  {key}: {value}")
    console.print(f"next: cd {result.root} && deltapatch ingest DATASET --task NAME (or deltapatch bench)")


@user_errors
def pretrain(force: bool = typer.Option(False, help="Retrain even if base.weights exists.")) -> None:
    """Pre-train the base model on the base task (only when params.yaml base.weights is missing)."""
    from deltapatch.config import load_params
    from deltapatch.models.base import load_base
    from deltapatch.models.pretrain import pretrain_base

    params = load_params()
    path = pretrain_base(params, force=force)
    base = load_base(params)
    console.print(f"base model: {path}\nfingerprint: {base.fingerprint}")


@user_errors
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder to write the task ImageFolders into."),
    tasks: list[str] = typer.Option(None, "--task", help="Only these tasks (repeatable)."),
) -> None:
    """Write the embedded patch tasks as ImageFolders (<out>/<task>/<class>/<image>.png)."""
    from deltapatch.config import load_params
    from deltapatch.data import builtin

    params = load_params()
    size, seed = int(params["base"]["input_size"]), int(params.get("seed", 0))
    for name in tasks or params["demo"]["tasks"]:
        root = builtin.write_imagefolder(name, out_dir, size, seed, int(params["demo"]["images_per_class"]))
        console.print(f"wrote {root}")


@user_errors
def train(
    task_dir: Path = typer.Argument(..., help="An ingested task folder (with manifest.csv)."),
    out: Path = typer.Option(None, help="Patch output folder (default: .deltapatch/patches/<task>)."),
    kind: str = typer.Option(None, help="Δ kind (default: params.yaml delta.kind)."),
    task: str = typer.Option(None, help="Task name (default: the folder name)."),
) -> None:
    """Train a Δ-patch for an ingested task folder and save it (no registry, no gate)."""
    from deltapatch.config import load_params, state_dir
    from deltapatch.data.dataset import load_task_dir
    from deltapatch.patching import train_patch

    params = load_params()
    need_base(params)
    data = load_task_dir(task_dir, int(params["base"]["input_size"]), name=task)
    out = out or state_dir(params) / "patches" / data.name
    result = train_patch(params, data, out_dir=out, kind=kind)
    console.print_json(json.dumps({"patch_dir": str(result.patch_dir), **result.metrics}))


@user_errors
def show_fingerprint() -> None:
    """Print the base model's fingerprint (sha256 over its state dict)."""
    from deltapatch.config import load_params
    from deltapatch.models.base import load_base

    console.print(load_base(load_params()).fingerprint)
