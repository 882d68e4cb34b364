"""`deltapatch doctor` on a healthy project (exit 0) and with its base removed (exit 1 naming the fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.flows.conftest import new_project


def test_doctor_passes_on_a_healthy_project_and_names_the_fix_without_a_base(
        base_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from deltapatch.cli import app
    from deltapatch.models.base import load_base

    params = new_project(base_project, tmp_path / "project")  # git + DVC with a local-folder remote
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DELTAPATCH_PROJECT", params["_root"])
    runner = CliRunner(env={"COLUMNS": "200"})
    healthy = runner.invoke(app, ["doctor"])
    assert healthy.exit_code == 0, healthy.output
    rows = {line.split()[0]: line for line in healthy.output.splitlines() if line.strip()}
    fingerprint = load_base(params).fingerprint
    assert " ok " in rows["params"] and " ok " in rows["base"] and fingerprint[7:19] in rows["base"]
    assert "test acc" in rows["base"] and "reachable" in rows["dvc"] and "all checks passed" in healthy.output
    for name in ("stack", "registry", "prefect", "cuda"):
        assert name in rows, healthy.output

    (Path(params["_root"]) / params["base"]["weights"]).unlink()
    broken = runner.invoke(app, ["doctor"])
    assert broken.exit_code == 1, broken.output
    assert "FAIL" in broken.output and "base.safetensors missing" in broken.output
    assert "→ base: `deltapatch pretrain`" in broken.output
