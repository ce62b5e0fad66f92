"""``h2o``: Heavy-Hitter Oracle.

Score = attention each entry has received, accumulated over the observation windows of all
chunks so far (a bounded stand-in for "all queries": see ``kvcli.attention.function``).
Keeps a recent window (``recent`` x budget, half by default) and the top-scored entries for
the rest, per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Method, fraction, keep_top

if TYPE_CHECKING:
    import torch

    from ..cache import GrowingLayer


@dataclass
class H2O(Method):
    name: ClassVar[str] = "h2o"
    description: ClassVar[str] = "H2O: heavy hitters (accumulated attention) + recent window"

    recent: float = 0.5  # share of the budget kept as the recent window

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recent = fraction(self, "recent", self.recent)

    @property
    def needs_scores(self) -> bool:
        return True

    def importance(self, layer: GrowingLayer) -> torch.Tensor:
        return layer.require("scores")

    def protected_entries(self, target: int) -> int:
        return self.n_sink + int(target * self.recent)

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        n_recent = int(target * self.recent)
        layer.gather(keep_top(layer.require("scores"), target, self.n_sink, n_recent))
