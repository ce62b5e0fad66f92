"""``h2o``: Heavy-Hitter Oracle.

Score = attention each entry has received, accumulated over the observation windows of all
chunks so far (a bounded stand-in for "all queries": see attention.py).  Keeps half the
budget as a recent window and the top-scored entries for the rest, per KV head.
"""

from .base import Method, keep_top


class H2O(Method):
    name = "h2o"
    description = "H2O: heavy hitters (accumulated attention) + recent window"
    needs_scores = True

    def __init__(self, recent_ratio: float = 0.5, **kw) -> None:
        super().__init__(**kw)
        self.recent_ratio = recent_ratio

    def options(self) -> dict:
        return {**super().options(), "recent_ratio": self.recent_ratio}

    def compress_layer(self, layer, target: int) -> None:
        n_recent = int(target * self.recent_ratio)
        layer.gather(keep_top(layer.valid("scores"), target, self.n_sink, n_recent))
