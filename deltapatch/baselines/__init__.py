"""Methods the benchmark compares, registered by name: adding one touches only its own file
plus one line here."""

from __future__ import annotations

from deltapatch.baselines.base import BenchContext, Classifier, Forward, Method, MethodSettings
from deltapatch.baselines.bn_patch import BNPatch
from deltapatch.baselines.delta import DeltaChannel, DeltaLowRank
from deltapatch.baselines.full_ft import FullFineTune
from deltapatch.baselines.linear_probe import LinearProbe
from deltapatch.baselines.paint import Paint
from deltapatch.baselines.peft_lora import PeftLora

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (DeltaLowRank, DeltaChannel, FullFineTune, LinearProbe, BNPatch, Paint, PeftLora)
}

__all__ = ["METHODS", "BenchContext", "Classifier", "Forward", "Method", "MethodSettings"]
