"""`deltapatch` command line: a thin layer over the library.

Each component registers its commands from its own module, so components never edit each other's
CLI code. Heavy imports (torch, mlflow, prefect) happen inside the commands, keeping `--help` fast.
"""

from __future__ import annotations

import importlib

import typer

from deltapatch.cli.errors import set_verbosity
from deltapatch.telemetry import disable_telemetry

disable_telemetry()

app = typer.Typer(
    name="deltapatch",
    help="Adapt a frozen CNN to new tasks with tiny Δ-patches; the base task never changes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)



@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Show MLflow/Prefect INFO logs and full tracebacks.")) -> None:
    """Adapt a frozen CNN to new tasks with tiny Δ-patches; the base task never changes.

    Start with `deltapatch doctor` when something looks off.
    """
    set_verbosity(verbose)


# Each module defines `register(app: typer.Typer) -> None`.
_COMMAND_MODULES = ("core", "data", "bench", "registry", "bases", "orchestration", "serving", "stream", "doctor",
                    "worker")

for _name in _COMMAND_MODULES:
    importlib.import_module(f"deltapatch.cli.{_name}").register(app)
