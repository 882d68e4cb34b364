"""Log a whole stream to one MLflow run, when a tracking URI is configured.

Configured means: `--tracking-uri` (or the `tracking_uri` argument), else `MLFLOW_TRACKING_URI`,
else the running local stack's MLflow server. Without any of them nothing is logged (the files
in OUT/ are the result). Metrics are logged per strategy with step = the number of tasks seen
(1 = the base task alone); the csv, md and png go in as artifacts.
"""

from __future__ import annotations

import math
import os
from typing import Any

from deltapatch.errors import RegistryError
from deltapatch.registry import store
from deltapatch.registry.tracking import (
    check_reachable,
    ensure_experiment,
    registry_settings,
    stack_mlflow_url,
)
from deltapatch.stream.results import StreamResult
from deltapatch.telemetry import disable_telemetry

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def configured_tracking_uri(params: dict[str, Any], explicit: str | None = None) -> str | None:
    """The URI to log the stream to, or None when the user configured none."""
    if explicit and explicit.strip():
        return explicit.strip()
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or stack_mlflow_url(params)


def check(params: dict[str, Any], uri: str) -> None:
    """Fail early, with the reason, when a server URI does not answer."""
    check_reachable(uri, registry_settings(params))


def metric_series(result: StreamResult) -> list[tuple[str, float, int]]:
    """(key, value, step) for every logged metric; step = number of tasks seen."""
    series: list[tuple[str, float, int]] = []
    for run in result.runs:
        s = run.strategy
        for step, arrival in enumerate(run.arrivals, start=1):
            accs = arrival.accuracies
            series += [(f"{s}/avg_acc_seen", sum(accs) / len(accs), step), (f"{s}/base_acc", accs[0], step),
                       (f"{s}/stored_bytes", float(arrival.stored_bytes), step),
                       (f"{s}/train_seconds", arrival.seconds, step),
                       (f"{s}/base_logits_max_abs_diff", arrival.base_logits_max_abs_diff, step)]
            series += [(f"{s}/acc/{run.tasks[j]}", acc, step) for j, acc in enumerate(accs)]
        final = len(run.arrivals)
        series += [(f"{s}/ACC", run.acc, final), (f"{s}/BWT", run.bwt, final), (f"{s}/FWT", run.fwt, final),
                   (f"{s}/train_seconds_total", run.train_seconds, final)]
    return [(k, v, step) for k, v, step in series if not math.isnan(v)]


def log_stream(params: dict[str, Any], uri: str, result: StreamResult) -> str:
    """Log `result` to a new run of experiment `stream.experiment`; returns '<uri> run <id>'."""
    disable_telemetry()
    from mlflow.entities import (  # lazy: mlflow takes seconds to import; used only when a tracking URI is configured
        Metric,
        Param,
    )
    from mlflow.exceptions import (
        MlflowException,  # lazy: mlflow takes seconds to import; used only when a tracking URI is configured
    )
    from mlflow.tracking import (
        MlflowClient,  # lazy: mlflow takes seconds to import; used only when a tracking URI is configured
    )

    store.register_scheme()  # mlflow-artifacts: URIs of a sqlite store resolve to the folder beside it
    store.init_store(uri)
    client = MlflowClient(uri)
    name = result.settings.experiment
    try:
        experiment = ensure_experiment(uri, name)
        run = client.create_run(experiment, run_name="stream-quick" if result.quick else "stream",
                                tags={"deltapatch.kind": "stream"})
        run_id = run.info.run_id
        settings = result.settings
        client.log_batch(run_id, params=[
            Param("strategies", ",".join(r.strategy for r in result.runs)), Param("tasks", ",".join(result.tasks)),
            Param("epochs", str(settings.epochs)), Param("quick", str(result.quick)),
            Param("max_train_per_class", str(settings.max_train_per_class)),
            Param("max_eval_per_class", str(settings.max_eval_per_class)),
            Param("base_model_bytes", str(result.base_bytes)),
        ])
        metrics = [Metric(k, v, 0, step) for k, v, step in metric_series(result)]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])
        for file in ("stream.csv", "stream.md", "stream.png"):
            client.log_artifact(run_id, str(result.out_dir / file))
        client.set_terminated(run_id)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"MLflow at {uri}: could not log the stream ({first})") from None
    return f"{uri} run {run_id}"
