"""Orchestration commands: run, submit, watch, stack up|status|down, demo."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from deltapatch.cli.core import need_base
from deltapatch.cli.errors import quiet_prefect_console, user_errors

console = Console()

stack_app = typer.Typer(name="stack", help="The local stack: Prefect + MLflow servers, gpu worker, flows, inbox watcher.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.command("run")(run_command)
    app.command("submit")(submit_command)
    app.command("watch")(watch_command)
    app.command("demo")(demo_command)
    app.add_typer(stack_app, name="stack")


def _params(project: Path | None = None) -> dict[str, Any]:
    from deltapatch.config import load_params

    return load_params(project.resolve() if project else None)


def _use_stack_env(params: dict[str, Any]) -> bool:
    """Point Prefect/MLflow clients of this process at the running stack (before importing prefect)."""
    from deltapatch.stack import client_env

    env = client_env(params)
    if env is None:
        return False
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return True


# --------------------------------------------------------------------------------------------- run


@user_errors
def run_command(
    path: Annotated[Path, typer.Argument(help="Task dataset: folder of class folders, or a .zip/.tar/.tar.gz.")],
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task name (default: from the dataset).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: params.yaml train.epochs).")] = None,
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Plain function calls, no Prefect at all.")] = False,
) -> None:
    """Run the patch-task pipeline here, in-process (training inline, no worker or stack needed).

    With a running stack the run shows in its Prefect UI; otherwise Prefect uses a temporary local API.
    """
    from deltapatch.config import project_root, state_dir

    params = _params()
    need_base(params)  # before anything is ingested
    root = project_root(params).resolve()
    if no_prefect:
        from deltapatch.pipeline import run_pipeline, summary_markdown

        outcome = run_pipeline(params, path.resolve(), task, epochs=epochs)
        console.print(summary_markdown(outcome))
        return
    if not _use_stack_env(params):
        os.environ.setdefault("PREFECT_HOME", str(state_dir(params) / "prefect"))
    from deltapatch.stack import ensure_flows_importable

    ensure_flows_importable()
    from flows.patch_task import patch_task_flow

    quiet_prefect_console()
    state = patch_task_flow(path=str(path.resolve()), task_name=task, project=str(root), train_on="inline",
                            epochs=epochs, return_state=True)
    if not state.is_completed():
        from deltapatch.errors import DeltapatchError

        try:
            state.result()  # the run's own error (with its hint), when Prefect kept it
        except DeltapatchError:
            raise
        except Exception:  # noqa: BLE001 — anything else: report the state below
            pass
        raise DeltapatchError(f"patch-task run {state.name}: {state.message}",
                              hint="see the run's log with `deltapatch --verbose run …`")
    result = state.result()
    _print_results([result])


# ----------------------------------------------------------------------------------- submit / watch


@user_errors
def submit_command(
    path: Annotated[Path, typer.Argument(help="Task dataset: folder of class folders, or a .zip/.tar/.tar.gz.")],
    task: Annotated[str | None, typer.Option("--task", "-t", help="Task name (default: from the dataset).")] = None,
) -> None:
    """Copy a dataset into the inbox and emit `deltapatch.task.arrived` (the patch-task trigger)."""
    from deltapatch.inbox import submit

    params = _params()
    need_base(params)  # before the dataset is copied or announced
    info = submit(params, path, task)
    console.print(f"submitted [bold]{info['task']}[/] → {info['path']} (event {info['event_id']})")


@user_errors
def watch_command(
    interval: Annotated[float, typer.Option(help="Seconds between inbox scans.")] = 1.0,
    stable_seconds: Annotated[float, typer.Option(help="A dataset is complete once unchanged this long.")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Scan until nothing is pending, then exit.")] = False,
) -> None:
    """Watch the inbox and emit `deltapatch.task.arrived` for each complete new dataset."""
    from deltapatch.inbox import InboxWatcher
    from deltapatch.prefect_api import api_url_for
    from deltapatch.stack import stack_dir

    params = _params()
    need_base(params)
    api_url = api_url_for(params)  # fail now, not at the first arrival
    watcher = InboxWatcher(params, stable_seconds=stable_seconds)
    console.print(f"watching {watcher.inbox} (every {interval} s, complete after {stable_seconds} s unchanged) "
                  f"for the Prefect API at {api_url}")
    announce = lambda p: console.print(f"announced {p.name}")  # noqa: E731
    if once:
        deadline = time.monotonic() + stable_seconds + 3 * interval
        while time.monotonic() < deadline:
            for p in watcher.poll():
                announce(p)
            time.sleep(interval)
        return
    watcher.run(interval, heartbeat=stack_dir(params) / "watcher.heartbeat", on_announce=announce)


# ------------------------------------------------------------------------------------------- stack


@stack_app.command("up")
@user_errors
def stack_up() -> None:
    """Start Prefect + MLflow servers, the gpu worker, the served flows and the inbox watcher.

    On a partly running stack, restart only the processes that are down (the others keep running).
    """
    from deltapatch.stack import up

    params = _params()
    need_base(params)  # the served flows and the serving app need it
    started = time.perf_counter()
    info = up(params, on_progress=lambda m: console.print(f"  {m}"))
    if info["kept"]:
        restarted = ", ".join(info["started"]) or "nothing (every process was running)"
        console.print(f"stack repaired in {time.perf_counter() - started:.0f} s: restarted {restarted}")
    else:
        console.print(f"stack up in {time.perf_counter() - started:.0f} s")
    _print_status(info)


@stack_app.command("status")
@user_errors
def stack_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """URLs and health of each stack process."""
    from deltapatch.stack import status

    info = status(_params())
    if as_json:
        console.print_json(json.dumps(info))
        return
    _print_status(info)
    if not info["running"]:
        raise typer.Exit(1)


@stack_app.command("down")
@user_errors
def stack_down() -> None:
    """Stop exactly the processes `stack up` started."""
    from deltapatch.stack import down

    stopped = down(_params(), on_progress=lambda m: console.print(f"  {m}"))
    console.print(f"stopped {len(stopped)} process(es)" if stopped else "nothing was running")


@stack_app.command("credentials")
@user_errors
def stack_credentials(
    rotate: Annotated[bool, typer.Option("--rotate", help="Replace the secrets (stack down).")] = False,
) -> None:
    """Generate the credentials of the stack's Prefect and MLflow servers (needed beyond loopback)."""
    from deltapatch.stack import credentials

    path = credentials(_params(), rotate=rotate)
    console.print(f"credentials in {path} (mode 0600; {'new secrets' if rotate else 'kept if it existed'}). "
                  "Every stack process uses them; copy the file to another machine's worker: "
                  "`deltapatch worker start --credentials FILE ...`")


def _print_status(info: dict[str, Any]) -> None:
    if not info["processes"]:
        console.print("stack: not running (start it with `deltapatch stack up`)")
        return
    table = Table("process", "pid", "state", "detail", "log")
    for name, p in info["processes"].items():
        state = "[green]healthy[/]" if p["healthy"] else "[yellow]running[/]" if p["running"] else "[red]stopped[/]"
        table.add_row(name, str(p["pid"]), state, p["detail"], p["log"])
    for name, a in info.get("automations", {}).items():
        state = "[green]healthy[/]" if a["healthy"] else "[red]missing[/]"
        table.add_row(f"{name} automation", "-", state, a["detail"], "")
    console.print(table)
    urls = info["urls"]
    console.print(f"Prefect UI: {urls['prefect_url']}\nMLflow UI:  {urls['mlflow_url']}")


# -------------------------------------------------------------------------------------------- demo


@user_errors
def demo_command(
    project: Annotated[Path, typer.Option(help="Scratch project folder for the demo (created).")] = Path(".demo"),
    tasks: Annotated[list[str] | None, typer.Option("--task", help="Only these tasks (default: params demo.tasks).")] = None,
    down_after: Annotated[bool, typer.Option("--down/--keep-running", help="Stop the stack at the end.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for all flow runs.")] = 1800.0,
) -> None:
    """The demo: scratch project, stack up, base model, submit the embedded tasks, wait, print results."""
    from deltapatch.demo import run_demo

    rows = run_demo(_params(), project, tasks=tasks, down_after=down_after, timeout=timeout,
                    say=lambda m: console.print(m))
    _print_results(rows["results"])
    console.print(f"total {rows['seconds']:.0f} s")
    console.print(f"Prefect UI: {rows['urls']['prefect_url']}\nMLflow UI:  {rows['urls']['mlflow_url']}")
    if not down_after:
        console.print(f"stack still running; stop it with `cd {rows['project']} && deltapatch stack down`")
    if any(r.get("status") != "promoted" for r in rows["results"]):
        raise typer.Exit(1)


def _print_results(results: list[dict[str, Any]]) -> None:
    table = Table("task", "version", "status", "patch acc", "base check", "params %", "bytes", "time s")
    for r in results:
        m = r.get("metrics") or {}
        base = next((c for c in (r.get("gate") or {}).get("checks", []) if c["name"] == "base"), None)
        base_text = "-" if base is None else ("bit-identical" if base["passed"] else "FAILED")
        table.add_row(r.get("task", "?"), str(r.get("version") or "-"), r.get("status", "?"),
                      _f(m.get("patch_acc")), base_text, _f(m.get("trainable_pct"), ".3f"),
                      f"{int(m.get('patch_bytes', 0)):,}" if m else "-", _f(r.get("seconds"), ".0f"))
    Console(width=max(console.width, 130)).print(table)  # keep columns whole in logs and pipes
    for r in results:
        if r.get("mlflow_url"):
            console.print(f"  {r['task']}: {r['mlflow_url']}")
        if r.get("message") and r.get("status") != "promoted":
            console.print(f"  {r['task']}: {r['message']}")


def _f(value: Any, spec: str = ".3f") -> str:
    try:
        return format(float(value), spec)
    except (TypeError, ValueError):
        return "-"
