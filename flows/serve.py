"""Process entry that `deltapatch stack up` starts: set up the gpu pool, the training deployment and the
automation that crashes its zombie runs, then serve `patch-task` (event-triggered) and
`rollback-patch` until stopped.

    python -m flows.serve --project /path/to/project [--pool gpu] [--limit 4]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deltapatch.telemetry import disable_telemetry

disable_telemetry()  # first: Prefect and MLflow read their opt-outs when imported

from prefect import serve  # noqa: E402
from prefect.settings import PREFECT_API_URL  # noqa: E402

from deltapatch.automations import ensure_zombie_automation  # noqa: E402
from deltapatch.config import load_params, project_root  # noqa: E402
from deltapatch.errors import DeltapatchError  # noqa: E402
from deltapatch.faults import fault_settings  # noqa: E402
from deltapatch.stack import stack_settings  # noqa: E402
from deltapatch.stack.results import ensure_result_storage  # noqa: E402
from flows.deployments import deploy_training, ensure_pool, pool_concurrency, served_deployments  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", default=os.environ.get("DELTAPATCH_PROJECT"))
    parser.add_argument("--pool", default=None)
    parser.add_argument("--limit", type=int, default=4, help="patch-task runs at once in this process")
    args = parser.parse_args(argv)

    params = load_params(None if args.project is None else Path(args.project))
    project = str(project_root(params).resolve())
    settings = stack_settings(params)
    pool = args.pool or settings.gpu_pool
    ensure_pool(pool, pool_concurrency(settings.pool_concurrency))
    print(f"flow results go to the storage block {ensure_result_storage(params)}", flush=True)
    deploy_training(project, pool)
    try:  # `stack up` ensures it too (and reports a failure); serving must not depend on it
        guard = ensure_zombie_automation(str(PREFECT_API_URL.value()).rstrip("/"), fault_settings(params))
        print(f"zombie automation {guard.action}: {guard.detail}", flush=True)
    except DeltapatchError as exc:
        print(f"WARNING: could not set up the zombie automation: {exc}", flush=True)
    serve(*served_deployments(project), limit=args.limit, pause_on_shutdown=False, print_starting_message=True)


if __name__ == "__main__":
    main()
