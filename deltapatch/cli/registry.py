"""Registry commands: `patches list|show|rollback`, `registry migrate`, `predict`, `serve`, `ui`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from deltapatch.cli.core import need_base
from deltapatch.cli.errors import user_errors

console = Console()

patches_app = typer.Typer(help="Registered Δ-patches (MLflow): list, show, roll back.", no_args_is_help=True)
registry_app = typer.Typer(help="The project's registry store (MLflow): migrate an older project to one store.",
                           no_args_is_help=True)
HASH_CHARS = 12  # fingerprints and data versions in tables: enough to tell them apart, full with --json


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.add_typer(patches_app, name="patches")
    app.add_typer(registry_app, name="registry")
    app.command("predict")(predict)
    app.command("serve")(serve)
    app.command("ui")(ui)


def _params() -> dict[str, Any]:
    from deltapatch.config import load_params

    return load_params()


def _fmt(value: object, spec: str = "") -> str:
    if value is None or value == "":
        return "-"
    return format(value, spec) if spec else str(value)


def short_hash(value: str | None) -> str:
    """'sha256:ab12…' / '<commit>:<md5>:<sha>' → its first 12 hex characters ('-' when empty)."""
    if not value:
        return "-"
    return value.removeprefix("sha256:")[:HASH_CHARS]


@patches_app.command("list")
@user_errors
def list_cmd(
    task: str = typer.Option(None, "--task", help="Only this task."),
    wide: bool = typer.Option(False, "--wide", help="Also bytes, trainable %, base check, creation time, run id."),
    as_json: bool = typer.Option(False, "--json", help="Every field, full hashes, as a JSON list."),
) -> None:
    """List registered patch versions: aliases, gate, accuracy, base and data version (12-char hashes)."""
    from deltapatch.registry.registry import list_patches

    rows = list_patches(_params(), task=task)
    if as_json:
        print(json.dumps([{k: v for k, v in r.items() if k != "tags"} | {"tags": r["tags"]} for r in rows], indent=2))
        return
    if not rows:
        console.print("no registered patches" + (f" for task '{task}'" if task else ""))
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    columns = ["task", "v", "alias", "gate", "acc", "base", "data"]
    if wide:
        columns += ["bytes", "params %", "base check", "created", "run"]
    for column in columns:
        table.add_column(column, no_wrap=column != "task", overflow="ellipsis" if column != "task" else "fold",
                         justify="right" if column in ("v", "acc", "bytes", "params %") else "left")
    for r in rows:
        gate = r["gate"] or "-"
        cells = [r["task"], str(r["version"]), ",".join(r["aliases"]) or "-",
                 f"[green]{gate}[/]" if gate == "passed" else f"[red]{gate}[/]",
                 _fmt(r["patch_acc"], ".3f"), short_hash(r["base_fingerprint"]), short_hash(r["data_version"])]
        if wide:
            cells += [_fmt(r["patch_bytes"], ","), _fmt(r["trainable_pct"], ".2f"), _fmt(r["base_check"]),
                      r["created"].replace("T", " ")[:16], short_hash(r["run_id"])]
        table.add_row(*cells)
    console.print(table)
    if not wide:
        console.print("[dim]--wide: sizes, base check, dates; --json: everything, full hashes[/]")


def _parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """TASK, TASK@VERSION or TASK@ALIAS → (task, version, alias)."""
    task, _, rest = ref.partition("@")
    if not rest:
        return task, None, None
    return (task, rest, None) if rest.isdigit() else (task, None, rest)


@patches_app.command("show")
@user_errors
def show_cmd(
    ref: str = typer.Argument(..., help="TASK, TASK@VERSION or TASK@ALIAS (default alias: champion)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one registered version: tags, lineage, gate, the model URI."""
    from deltapatch.registry.registry import get_version, model_uri

    task, version, alias = _parse_ref(ref)
    params = _params()
    info = get_version(params, task, version=version, alias=alias)
    info["model_uri"] = model_uri(params, task, version=info["version"])
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return
    table = Table(title=f"{info['model_name']} version {info['version']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("model_uri", "aliases", "gate", "patch_acc", "base_check", "base_fingerprint", "base_version",
                "data_version", "patch_bytes", "trainable_pct", "registration", "created", "run_id", "description"):
        value = info.get(key)
        table.add_row(key, ", ".join(value) if isinstance(value, list) else _fmt(value))
    for key, value in sorted(info["tags"].items()):
        if key not in info:
            table.add_row(f"tag {key}", value)
    console.print(table)


@patches_app.command("rollback")
@user_errors
def rollback_cmd(
    task: str = typer.Argument(..., help="Task whose champion to move back."),
    to: int = typer.Option(None, "--to", help="Version to roll back to (default: the previous gate-passed one)."),
    reason: str = typer.Option("", "--reason", help="Why (recorded as a tag)."),
) -> None:
    """Move `champion` to the previous gate-passed version (or --to VERSION)."""
    from deltapatch.registry.registry import rollback

    old, new = rollback(_params(), task, to=to, reason=reason)
    console.print(f"{task}: champion moved from version {old} to version {new}" + (f" ({reason})" if reason else ""))


@registry_app.command("migrate")
@user_errors
def migrate_cmd(dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be done.")) -> None:
    """Merge an older project's two registry stores (and local-path artifact locations) into one."""
    from deltapatch.config import state_dir
    from deltapatch.registry.migrate import migrate, plan
    from deltapatch.stack import mlflow_running

    params = _params()
    state = state_dir(params)
    if dry_run:
        console.print(plan(state) or "nothing to migrate: the project has one registry store")
        return
    report = migrate(state, stack_running=mlflow_running(params))
    for line in report.actions:
        console.print(f"  {line}")
    if report.backup:
        console.print(f"backup of the previous files: {report.backup}")


@user_errors
def predict(
    images: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/...)."),
    task: str = typer.Option(..., "--task", help="Task name, or 'base' for the base model."),
    version: int = typer.Option(None, "--version", help="Registered version (default: the champion)."),
    alias: str = typer.Option(None, "--alias", help="Registered alias (default: champion)."),
    top: int = typer.Option(3, "--top", help="Scores shown per image."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Classify images with a task's registered patch (models:/deltapatch-<task>@champion by default)."""
    from deltapatch.registry.runtime import read_image_files

    if version is not None and alias is not None:
        raise typer.BadParameter("give --version or --alias, not both")
    params = _params()
    need_base(params)
    size = int(params["base"]["input_size"])
    arrays = read_image_files(list(images), size)
    if task == "base" and version is None and alias is None:
        from deltapatch.models.base import load_base
        from deltapatch.registry.runtime import Predictor

        rows = Predictor(load_base(params)).predict(arrays, "base")
    else:
        rows = _predict_registered(params, task, version, alias, arrays)
    if as_json:
        print(json.dumps([{"image": str(p), **r} for p, r in zip(images, rows, strict=True)], indent=2))
        return
    for path, r in zip(images, rows, strict=True):
        best = sorted(r["scores"].items(), key=lambda kv: -kv[1])[: max(1, top)]
        others = "  ".join(f"{name} {score:.3f}" for name, score in best[1:])
        console.print(f"{path}: [bold]{r['class']}[/] {r['score']:.3f}" + (f"   ({others})" if others else ""))


def _predict_registered(params: dict[str, Any], task: str, version: int | None, alias: str | None,
                        arrays: list[Any]) -> list[dict[str, Any]]:
    import mlflow

    from deltapatch.errors import RegistryError
    from deltapatch.registry.registry import get_version, model_uri
    from deltapatch.registry.tracking import configure

    configure(params)
    info = get_version(params, task, version=version, alias=alias)  # clear error when missing
    uri = model_uri(params, task, version=info["version"])
    try:
        with tempfile.TemporaryDirectory(prefix="deltapatch-predict-") as tmp:  # no download left behind
            frame = mlflow.pyfunc.load_model(uri, dst_path=tmp).predict(arrays)
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"{uri}: {str(exc).splitlines()[0]}") from None
    return [
        {"task": task, "version": info["version"], "class": row["class"], "class_index": int(row["class_index"]),
         "score": float(row["score"]), "scores": json.loads(row["scores"])}
        for _, row in frame.iterrows()
    ]


@user_errors
def serve(
    host: str = typer.Option(None, "--host", help="Bind address (default: params.yaml registry.serve_host)."),
    port: int = typer.Option(None, "--port", help="Port (default: params.yaml registry.serve_port)."),
) -> None:
    """HTTP service: the base and every champion patch, mixed batches, follows alias moves."""
    from deltapatch.serve import run

    params = _params()
    need_base(params)
    run(params, host=host, port=port)


@user_errors
def ui(open_browser: bool = typer.Option(False, "--open", help="Open it in a browser.")) -> None:
    """Print (or open) the MLflow UI URL of the running stack."""
    from deltapatch.errors import RegistryError
    from deltapatch.registry.tracking import local_store, registry_settings, ui_url

    params = _params()
    url = ui_url(params)
    if url is None:
        uri, artifacts = local_store(params)
        raise RegistryError(
            "no MLflow server is running (the registry is the local sqlite store); start the stack "
            f"(`deltapatch stack up`) or browse the store with: mlflow ui --backend-store-uri {uri} "
            f"--artifacts-destination {artifacts} --host 127.0.0.1 --port 5000"
        )
    page = f"{url}/#/models"
    print(page)
    Console(stderr=True).print(f"[dim]patches: {url}/#/models/{registry_settings(params).model_prefix}<task>[/]", highlight=False)
    if open_browser:
        import webbrowser

        webbrowser.open(page)
