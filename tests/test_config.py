"""params.yaml and the settings dataclasses of every component stay in sync."""

from __future__ import annotations

import pytest

from deltapatch.config import ConfigError, load_params, section
from tests.conftest import REPO_ROOT, make_project


def _sections():
    from deltapatch.bench import BenchSettings
    from deltapatch.bench_serve import BenchServeSettings
    from deltapatch.data.versioning import DataSettings
    from deltapatch.faults import FaultSettings
    from deltapatch.gate import GateSettings
    from deltapatch.models.base import BaseSettings
    from deltapatch.models.pretrain import PretrainSettings
    from deltapatch.patching import DeltaSettings
    from deltapatch.registry.tracking import RegistrySettings
    from deltapatch.serve import ServeSettings
    from deltapatch.stack import StackSettings
    from deltapatch.stream.settings import StreamSettings
    from deltapatch.train import TrainSettings

    return {"base": BaseSettings, "pretrain": PretrainSettings, "delta": DeltaSettings, "train": TrainSettings,
            "data": DataSettings, "gate": GateSettings, "stack": StackSettings, "bench": BenchSettings,
            "registry": RegistrySettings, "serve": ServeSettings, "bench_serve": BenchServeSettings,
            "stream": StreamSettings, "faults": FaultSettings}


def test_every_section_of_the_shipped_params_yaml_is_known():
    params = load_params(REPO_ROOT)
    for name, cls in _sections().items():
        assert name in params, f"params.yaml lacks section '{name}'"
        section(params, name, cls)
    known = set(_sections()) | {"seed", "demo", "_root"}
    assert set(params) <= known, f"unknown top-level sections: {set(params) - known}"


def test_unknown_key_is_named_with_the_known_ones(tmp_path):
    from deltapatch.train import TrainSettings

    params = make_project(tmp_path, {"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epochz'\] in section 'train'"):
        section(params, "train", TrainSettings)


def test_project_is_found_from_a_subfolder(tmp_path, monkeypatch):
    from deltapatch.config import find_project_root

    make_project(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.delenv("DELTAPATCH_PROJECT", raising=False)
    assert find_project_root(tmp_path / "a" / "b") == tmp_path
    with pytest.raises(ConfigError, match="no params.yaml found"):
        find_project_root(tmp_path.parent)
