"""Arrival burst, PostgreSQL vs SQLite (issue 15): for each database, a scratch project and its own
stack, N arrivals submitted within S seconds, and how many started a `patch-task` run (0 dropped
events is the target); prints a table and writes arrival-burst.md / .json into OUT.

    python benchmarks/arrival_burst.py OUT [--arrivals 20] [--within 10] [--window 180] \
        [--database postgres --database sqlite] [--base-from PROJECT]

The base weights are copied from --base-from (a project with a pre-trained base; default: the
current project), else pre-trained once. As root, the PostgreSQL cluster lives in a folder under
/tmp the `postgres` user can enter (deltapatch/stack/postgres.py). Every stack is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import yaml

from deltapatch import stack
from deltapatch.burst import BurstResult, markdown_table, run_burst, write_sources
from deltapatch.config import find_project_root, load_params
from deltapatch.demo import prepare_project


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _project(folder: Path, database: str, src: dict, pg_folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((Path(src["_root"]) / "params.yaml").read_text())
    raw.setdefault("stack", {}).update({
        "database": database, "prefect_port": _free_port(), "mlflow_port": _free_port(),
        "postgres_port": _free_port(), "postgres_dir": str(pg_folder), "serve_app": False,
        "watch_stable_seconds": 1.0, "startup_timeout": 300})
    raw.setdefault("train", {}).update({"epochs": 1, "min_steps": 0, "threads": 1})
    raw.setdefault("gate", {})["min_patch_accuracy"] = 0.0  # 1-epoch patches: what fails is the event path, not the gate
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return prepare_project(src, folder, print)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arrivals", type=int, default=20)
    parser.add_argument("--within", type=float, default=10.0, help="seconds over which the arrivals are submitted")
    parser.add_argument("--window", type=float, default=180.0, help="seconds to watch for their runs")
    parser.add_argument("--database", action="append", choices=["postgres", "sqlite"])
    parser.add_argument("--base-from", type=Path, default=None)
    args = parser.parse_args(argv)
    databases = args.database or ["postgres", "sqlite"]
    src = load_params(args.base_from.resolve() if args.base_from else find_project_root())
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="deltapatch-burst-"))
    scratch.chmod(0o711)  # the postgres user passes through (as root)
    results: list[BurstResult] = []
    try:
        sources = write_sources(scratch / "sources", args.arrivals)
        for database in databases:
            params = _project(scratch / database, database, src, scratch / f"pg-{database}")
            try:
                stack.up(params, on_progress=lambda m: print(f"  {m}", flush=True))
                print(f"{database}: burst of {args.arrivals} arrivals within {args.within:.0f} s", flush=True)
                results.append(run_burst(params, sources, args.within, args.window, say=print))
            finally:
                stack.down(params)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = markdown_table(results)
    print(table)
    (args.out / "arrival-burst.md").write_text(table)
    (args.out / "arrival-burst.json").write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n")
    return 0 if all(r.dropped == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
