"""``snapkv``: SnapKV.

Score = attention from the observation window (the last queries of the latest chunk, or the
user's question when query-aware), pooled over neighbouring positions (avg-pool, ``kernel``
5) so kept entries carry their context, summed over the query heads of each KV group.  Keeps
the last ``window`` entries plus the top-scored entries, per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..core import defaults
from ..core.errors import KvcliError
from .base import Method, integer, keep_top

if TYPE_CHECKING:
    import torch

    from ..cache import GrowingLayer


@dataclass
class SnapKV(Method):
    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: observation-window attention, pooled, + window"

    window: int = defaults.OBS_WINDOW  # most recent entries always kept
    kernel: int = 5  # pooling width (odd, so the pool is centred)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.window = integer(self, "window", self.window, minimum=0)
        self.kernel = integer(self, "kernel", self.kernel)
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise KvcliError(f"snapkv: option kernel must be an odd positive integer, got {self.kernel}")

    @property
    def needs_scores(self) -> bool:
        return True

    def importance(self, layer: GrowingLayer) -> torch.Tensor:
        """The observation's attention, pooled over neighbouring entries."""
        import torch.nn.functional as F  # here, not at the top: checking options needs no torch

        obs = layer.require("obs")
        b, h, n = obs.shape
        return F.avg_pool1d(
            obs.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False
        ).reshape(b, h, n)

    def protected_entries(self, target: int) -> int:
        return self.n_sink + self.window

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        layer.gather(keep_top(self.importance(layer), target, self.n_sink, self.window))
