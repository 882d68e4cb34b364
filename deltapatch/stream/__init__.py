"""The continual-learning stream: Δ-patching against continual-learning strategies on one task
stream — accuracy matrix, ACC/BWT/FWT, storage growth (docs/benchmark.md, "Continual-learning stream").

    from deltapatch.stream import run_stream
    result = run_stream(params, quick=True, out_dir=Path("stream-results"))
"""

from deltapatch.stream.results import Arrival, StrategyRun, StreamResult
from deltapatch.stream.runner import run_stream
from deltapatch.stream.settings import StreamSettings

__all__ = ["Arrival", "StrategyRun", "StreamResult", "StreamSettings", "run_stream"]
