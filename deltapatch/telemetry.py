"""Switch off every phone-home of the stack before any of it is imported.

Prefect, MLflow and DVC each contact a telemetry host by default; these machines are offline and
users may be too. Entry points call :func:`disable_telemetry` first thing.
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "DVC_NOUPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# Set by the CLI (deltapatch.cli.errors.set_verbosity) to the names of the variables it set to keep
# MLflow/Prefect INFO logging out of its output; processes the stack starts drop them (full logs).
QUIETED_MARKER = "DELTAPATCH_QUIETED"


def disable_telemetry() -> None:
    """Set the opt-out variables unless the user set them explicitly."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
