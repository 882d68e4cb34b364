"""Issue 15: an arrival burst on the PostgreSQL stack — every arrival event starts a `patch-task` run
(bounded: 10 arrivals within 5 s, their runs created within 3 min). `benchmarks/arrival_burst.py`
runs the full 20-in-10-s burst on PostgreSQL and SQLite side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.test_postgres_stack_e2e import pg_dir, postgres_project  # noqa: F401 (pg_dir: a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_env")]

ARRIVALS = 10
WITHIN_S = 5.0


def test_every_arrival_of_a_burst_starts_a_run_on_postgres(base_project: dict[str, Any], tmp_path: Path,
                                                           pg_dir: Path) -> None:  # noqa: F811
    from deltapatch import stack
    from deltapatch.burst import run_burst, write_sources

    params = postgres_project(base_project, tmp_path / "project", pg_dir)
    sources = write_sources(tmp_path / "sources", ARRIVALS, per_class=8)
    try:
        stack.up(params)
        result = run_burst(params, sources, WITHIN_S, window_s=180, until_running=False)
    finally:
        entries = list(((stack.read_state(params) or {}).get("processes") or {}).values())
        stack.down(params)
        assert not [e["cmd"] for e in entries if stack.is_running(e)], "stack down left processes running"
    print(result.as_dict())
    assert result.submitted_in_s <= WITHIN_S + 2, result
    assert result.dropped == 0 and not result.missing, result.as_dict()
