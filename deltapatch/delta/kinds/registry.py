"""Registry of Δ kinds: adding a kind = one new file with a config and a layer, decorated."""

from __future__ import annotations

from typing import Any

from deltapatch.delta.kinds.base import DeltaConfig, DeltaLayer

DELTA_KINDS: dict[str, type[DeltaLayer]] = {}


def register_delta_kind(layer_class: type[DeltaLayer]) -> type[DeltaLayer]:
    """Class decorator: make `layer_class` available under its config's `kind` name."""
    kind = layer_class.config_class.kind
    DELTA_KINDS[kind] = layer_class
    return layer_class


def make_config(kind: str, options: dict[str, Any] | None = None) -> DeltaConfig:
    """Build the config of Δ kind `kind` from params.yaml's `delta.<kind>` options."""
    if kind not in DELTA_KINDS:
        raise ValueError(f"unknown Δ kind '{kind}'; available: {sorted(DELTA_KINDS)} (params.yaml delta.kind)")
    config_class = DELTA_KINDS[kind].config_class
    return config_class(**(options or {}))


def layer_class(kind: str) -> type[DeltaLayer]:
    return DELTA_KINDS[kind]
