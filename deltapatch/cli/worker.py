"""`deltapatch worker start`: a GPU worker for the stack's pool, on this or another machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from deltapatch.cli.errors import user_errors

console = Console()
worker_app = typer.Typer(name="worker", help="A GPU worker of the stack's pool (on this or another machine).",
                         no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this component's commands to `app`."""
    app.add_typer(worker_app, name="worker")


@worker_app.command("start")
@user_errors
def worker_start(
    project: Annotated[Path, typer.Option(help="This machine's clone of the project.")] = Path("."),
    prefect_api: Annotated[str | None, typer.Option(help="The stack's Prefect API (default $PREFECT_API_URL).")] = None,
    mlflow: Annotated[str | None, typer.Option(help="The stack's MLflow server (default $MLFLOW_TRACKING_URI).")] = None,
    name: Annotated[str | None, typer.Option(help="Worker name shown on its flow runs (default gpu-worker-<host>-<folder>).")] = None,
    limit: Annotated[int, typer.Option(help="Training runs at once on this worker (0: no limit of its own).")] = 0,
    credentials: Annotated[Path | None, typer.Option(
        help="A copy of the stack's credentials.json (`deltapatch stack credentials`), for a stack beyond loopback.")] = None,
) -> None:
    """Run `prefect worker start --pool <stack.gpu_pool> --type process` with the environment a training
    run needs on this machine (its own PREFECT_HOME and clone; results and registry through the stack's
    servers and shared storage). Runs in the foreground, like `prefect worker start`."""
    from deltapatch.config import (  # lazy: keeps `deltapatch --help` fast
        ConfigError,
        load_params,
    )
    from deltapatch.models.base import base_weights_path  # lazy: imports torch
    from deltapatch.stack import stack_settings  # lazy: keeps `deltapatch --help` fast
    from deltapatch.worker import (  # lazy: keeps `--help` fast
        server_urls,
        worker_command,
        worker_env,
        worker_name,
    )

    params = load_params(project.resolve())
    weights = base_weights_path(params)
    if not weights.is_file():  # pre-training here would make another base: its patches would not fit
        raise ConfigError(f"no base weights at {weights}",
                          hint="copy the stack machine's base weights (the same file: patches are tied to its "
                               "fingerprint) into this clone before starting its worker")
    prefect_url, mlflow_url = server_urls(prefect_api, mlflow)
    cmd = worker_command(stack_settings(params).gpu_pool, name or worker_name(params), limit)
    env = worker_env(params, prefect_url, mlflow_url, credentials=credentials)
    console.print(f"worker {cmd[cmd.index('--name') + 1]} on pool {stack_settings(params).gpu_pool} for "
                  f"{prefect_url} (project {params['_root']}, PREFECT_HOME {env['PREFECT_HOME']})")
    os.execve(cmd[0], cmd, env)  # the worker itself, in the foreground: signals reach it directly
