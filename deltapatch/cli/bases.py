"""Base commands: `base list|show|upgrade|rollback` (docs/registry.md "Base upgrades")."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from deltapatch.cli.core import need_base
from deltapatch.cli.errors import quiet_prefect_console, user_errors

console = Console()
base_app = typer.Typer(help="Base model versions (MLflow deltapatch-base): list, show, upgrade, roll back.",
                       no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(base_app, name="base")


def _params() -> dict[str, Any]:
    from deltapatch.config import load_params

    params = load_params()
    need_base(params)
    return params


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@base_app.command("list")
@user_errors
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Every field, as JSON.")] = False) -> None:
    """Registered bases, newest first; the one in service is marked (the project's base is put in
    service first when no base is yet)."""
    from deltapatch.base_versions import adopt
    from deltapatch.registry.bases import list_bases

    params = _params()
    adopt(params)
    rows = list_bases(params)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("v", "in service", "arch", "base acc", "fingerprint", "patches", "unavailable", "dvc"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r.version), "[green]champion[/]" if r.in_service else "-", r.arch or "-", _acc(r.base_acc),
                      r.fingerprint.removeprefix("sha256:")[:12], ", ".join(f"{t} v{v}" for t, v in sorted(r.release.items())) or "-",
                      ", ".join(sorted(r.unavailable)) or "-", r.dvc_rev[:12] or "-")
    console.print(table)


@base_app.command("show")
@user_errors
def show_cmd(version: Annotated[int | None, typer.Argument(help="Base version (default: the one in service).")] = None,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """One base version: fingerprint, architecture, accuracy, its patches, rebase links, switches."""
    from deltapatch.registry.bases import get_base

    info = get_base(_params(), version)
    if as_json:
        print(json.dumps(info.as_dict(), indent=2))
        return
    table = Table(title=f"deltapatch-base version {info.version}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in info.as_dict().items():
        if key != "tags":
            table.add_row(key, str(value))
    for key, value in sorted(info.tags.items()):
        if key.startswith("rebased/") or key in ("partial_release", "switch_reason", "switched_at"):
            table.add_row(key, value)
    console.print(table)


@base_app.command("upgrade")
@user_errors
def upgrade_cmd(
    weights: Annotated[Path, typer.Argument(help="Weights of the new base (.safetensors, or a .pt/.pth state dict).")],
    arch: Annotated[str | None, typer.Option("--arch", help="torchvision architecture (default: the file's sidecar, else base.arch).")] = None,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Switch even if some tasks fail their gate (listed as unavailable).")] = False,
    epochs: Annotated[int | None, typer.Option(help="Training epochs per task (default: train.epochs).")] = None,
    train_on: Annotated[str, typer.Option("--train-on", help="auto | pool | inline")] = "auto",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Plain function calls, no Prefect at all.")] = False,
) -> None:
    """Register WEIGHTS as a new base, rebase every served patch onto it (flow `rebase-patches`), switch once."""
    from deltapatch.base_versions import adopt, register_weights
    from deltapatch.config import project_root, state_dir

    params = _params()
    current = adopt(params)
    new = register_weights(params, weights, arch)
    console.print(f"base v{new.version} registered ({new.arch}, accuracy {_acc(new.base_acc)}); "
                  f"in service: v{current.version} ({_acc(current.base_acc)})")
    if no_prefect:
        from deltapatch.rebase import rebase

        console.print(rebase(params, new.version, allow_partial=allow_partial, epochs=epochs, say=console.print).message)
        return
    from deltapatch.cli.orchestration import _use_stack_env

    if not _use_stack_env(params):
        os.environ.setdefault("PREFECT_HOME", str(state_dir(params) / "prefect"))
    from deltapatch.stack import ensure_flows_importable

    ensure_flows_importable()
    from flows.rebase import rebase_patches_flow

    quiet_prefect_console()
    state = rebase_patches_flow(base_version=new.version, project=str(project_root(params).resolve()),
                                allow_partial=allow_partial, epochs=epochs, train_on=train_on, return_state=True)
    result = state.result()  # raises the run's own error (RebaseRefused names the tasks) when it failed
    from deltapatch.rebase import BaseGate, RebaseOutcome, report_markdown
    from deltapatch.registry.bases import SwitchRecord

    console.print(report_markdown(BaseGate.from_dict(result["gate"]),
                                  [RebaseOutcome.from_dict(o) for o in result["outcomes"]], SwitchRecord(**result["switch"]),
                                  result.get("timing", "")))


@base_app.command("rollback")
@user_errors
def rollback_cmd(to: Annotated[int | None, typer.Option("--to", help="Base version (default: the one the current base replaced).")] = None,
                 reason: Annotated[str, typer.Option("--reason")] = "") -> None:
    """Put the previous base and the patches it served back in service, in one switch."""
    from deltapatch.base_versions import roll_back

    record = roll_back(_params(), to=to, reason=reason or "deltapatch base rollback")
    console.print(f"base v{record.from_version} → v{record.to_version} with "
                  + (", ".join(f"{t} v{v}" for t, v in sorted(record.tasks.items())) or "no patches")
                  + (f"; unavailable: {', '.join(sorted(record.unavailable))}" if record.unavailable else ""))
