"""`deltapatch base list|show|upgrade|rollback` on a real project (git + DVC, MLflow sqlite store):
the project's base is put in service as version 1, and bad WEIGHTS are refused with one line naming
the file and the fix (no traceback, nothing registered, nothing trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flows.conftest import new_project


@pytest.fixture
def cli(base_project: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from typer.testing import CliRunner

    from deltapatch.cli import app

    params = new_project(base_project, tmp_path / "project")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DELTAPATCH_PROJECT", params["_root"])
    runner = CliRunner(env={"COLUMNS": "200"})
    return lambda *args: runner.invoke(app, ["base", *args]), params


def test_list_puts_the_project_base_in_service_and_bad_weights_are_refused(cli: Any, tmp_path: Path) -> None:
    from deltapatch.base_versions import local_fingerprint
    from deltapatch.registry.bases import list_bases

    run, params = cli
    listed = run("list")
    assert listed.exit_code == 0, listed.output
    assert "champion" in listed.output and local_fingerprint(params)[7:19] in listed.output
    shown = run("show", "--json")
    assert shown.exit_code == 0 and '"in_service": true' in shown.output and '"base_acc": 0.' in shown.output
    assert (Path(params["_root"]) / "models" / "base.safetensors.dvc").is_file()  # the weights are DVC-tracked

    missing = run("upgrade", str(tmp_path / "nope.safetensors"), "--no-prefect")
    assert missing.exit_code == 2 and "nope.safetensors: no such weights file" in missing.output
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not weights at all")
    unreadable = run("upgrade", str(garbage), "--no-prefect")
    assert unreadable.exit_code == 2 and "garbage.safetensors: cannot read weights safely" in unreadable.output
    weights = Path(params["_root"]) / "models" / "base.safetensors"
    wrong = run("upgrade", str(weights), "--arch", "resnet34", "--no-prefect")
    assert wrong.exit_code == 2 and "base.safetensors: these weights do not fit architecture 'resnet34'" in wrong.output
    assert "pass --arch" in wrong.output
    unknown = run("upgrade", str(weights), "--arch", "no-such-net", "--no-prefect")
    assert unknown.exit_code == 2 and "architecture 'no-such-net' is not a torchvision model" in unknown.output
    for result in (missing, unreadable, wrong, unknown):
        assert "Traceback" not in result.output
    same = run("upgrade", str(weights), "--no-prefect")  # the base in service itself: nothing to do
    assert same.exit_code == 2 and "already in service" in same.output
    assert [b.version for b in list_bases(params)] == [1]
    nothing = run("rollback")
    assert nothing.exit_code == 2 and "replaced no other base" in nothing.output


def test_upgrade_without_prefect_then_rollback(cli: Any, tmp_path: Path) -> None:
    """The library path (deltapatch.rebase.rebase) behind `base upgrade --no-prefect`, on one task."""
    from safetensors.torch import save_file

    from deltapatch import pipeline
    from deltapatch.models.base import read_state_dict
    from deltapatch.registry import bases
    from tests.flows.conftest import write_task

    run, params = cli
    params["gate"].update({"min_patch_accuracy": 0.0, "rebase_tolerance": 1.0, "base_upgrade_tolerance": 1.0})
    params_file = Path(params["_root"]) / "params.yaml"
    on_disk = yaml.safe_load(params_file.read_text())
    on_disk["gate"].update({"base_upgrade_tolerance": 1.0, "rebase_tolerance": 1.0})
    params_file.write_text(yaml.safe_dump(on_disk, sort_keys=False))
    pipeline.run_pipeline(params, write_task(tmp_path / "src", "shapes", per_class=8), "shapes", epochs=1, progress=False)
    state = read_state_dict(Path(params["_root"]) / "models" / "base.safetensors")
    bias = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1].replace("weight", "bias")
    state[bias] = state[bias] + 1e-3
    save_file(state, str(tmp_path / "new.safetensors"))

    upgraded = run("upgrade", str(tmp_path / "new.safetensors"), "--no-prefect", "--epochs", "1")
    assert upgraded.exit_code == 0, upgraded.output
    assert "| shapes | v1 → v2 |" in upgraded.output and "Switched" in upgraded.output
    assert bases.serving_set(params).base_version == 2
    shown = run("show")
    assert shown.exit_code == 0 and "rebased/shapes" in shown.output and "v1 → v2: gate passed" in shown.output
    back = run("rollback")
    assert back.exit_code == 0 and "base v2 → v1 with shapes v1" in back.output, back.output
    assert bases.serving_set(params).tasks["shapes"]["version"] == 1
