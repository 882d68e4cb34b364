"""Continual-learning strategies the stream compares, registered by name: adding one touches only
its own file plus one line here."""

from __future__ import annotations

from deltapatch.stream.strategies.base import Strategy, StrategySettings, StreamContext
from deltapatch.stream.strategies.delta import DeltaPatching
from deltapatch.stream.strategies.ewc import Ewc
from deltapatch.stream.strategies.lora import LoraPerTask
from deltapatch.stream.strategies.lwf import Lwf
from deltapatch.stream.strategies.naive import NaiveFineTune
from deltapatch.stream.strategies.paint import SequentialPaint
from deltapatch.stream.strategies.replay import Replay

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (DeltaPatching, NaiveFineTune, Ewc, Lwf, Replay, LoraPerTask, SequentialPaint)
}

__all__ = ["STRATEGIES", "Strategy", "StrategySettings", "StreamContext"]
