"""Δ kinds. Importing this package registers every built-in kind."""

from deltapatch.delta.kinds import channel, lowrank  # noqa: F401  (registration side effect)
from deltapatch.delta.kinds.base import DeltaConfig, DeltaLayer
from deltapatch.delta.kinds.registry import DELTA_KINDS, layer_class, make_config

__all__ = ["DELTA_KINDS", "DeltaConfig", "DeltaLayer", "layer_class", "make_config"]
