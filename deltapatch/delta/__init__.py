"""The Δ-Networks method: Δ kinds, layer wrappers, the routed network and the patch format."""

from deltapatch.delta.kinds import DELTA_KINDS, DeltaConfig, make_config
from deltapatch.delta.network import DeltaNetwork, validate_task_name
from deltapatch.delta.routing import BASE

__all__ = ["BASE", "DELTA_KINDS", "DeltaConfig", "DeltaNetwork", "make_config", "validate_task_name"]
