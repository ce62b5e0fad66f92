"""``snapkv``: SnapKV.

Score = attention from the observation window (the last queries of the latest chunk, or the
user's question when query-aware), pooled over neighbouring positions (avg-pool, kernel 5)
so kept entries carry their context, summed over the query heads of each KV group.  Keeps
the observation window itself plus the top-scored entries, per KV head.
"""

import torch.nn.functional as F

from .base import Method, keep_top


class SnapKV(Method):
    name = "snapkv"
    description = "SnapKV: observation-window attention, pooled, + window"
    needs_scores = True

    def __init__(self, window: int = 64, kernel: int = 5, **kw) -> None:
        super().__init__(**kw)
        self.window, self.kernel = window, kernel

    def options(self) -> dict:
        return {**super().options(), "window": self.window, "kernel": self.kernel}

    def compress_layer(self, layer, target: int) -> None:
        obs = layer.valid("obs")
        b, h, n = obs.shape
        pooled = F.avg_pool1d(obs.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False).reshape(b, h, n)
        layer.gather(keep_top(pooled, target, self.n_sink, self.window))
