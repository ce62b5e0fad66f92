"""``snapkv``: SnapKV.

Score = attention from the observation window (the last queries of the latest chunk, or the
user's question when query-aware), pooled over neighbouring positions (``kernel`` 5) so kept
entries carry their context, summed over the query heads of each KV group.  Keeps the last
``window`` entries plus the top-scored entries, per KV head.

``pool``: ``max`` (the default) or ``avg`` (the paper's; the SnapKV authors' code has both).
An average blurs a sharp per-entry score such as reconstruction's (the default scoring); the
maximum keeps every entry within ``kernel // 2`` of a high-scored one as high.  Measured with
reconstruction scores on both models (docs/scoring.md): ``max`` kept as many tasks or more in
every configuration.

``ahead``: with ``max``, each entry also takes the maximum of this many entries after the
kernel's right edge (default 2 with ``max``, so entry i sees i-2 .. i+4; 0, the centred
pool, with ``avg``).  Reconstruction scores rise along a copied span (its first tokens are
read least surely, and a question reads them first), so looking further ahead than back
lifts a span's start.  Measured on both models at 2K and 4K (docs/scoring.md): more tasks
than the centred pool on Gemma over both budgets, as many on SmolLM2; the one task lost
(Gemma 2K at 0.5) is one the full cache misses too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..core import defaults
from ..core.errors import KvcliError
from .base import Method, choice, integer, keep_top, odd_width, pool_scores

if TYPE_CHECKING:
    import torch

    from ..cache import GrowingLayer


@dataclass
class SnapKV(Method):
    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "SnapKV: observation-window attention, pooled, + window"
    allocation: ClassVar[str] = "relative"  # measured on both models (docs/scoring.md)

    window: int = defaults.OBS_WINDOW  # most recent entries always kept
    kernel: int = 5  # pooling width (odd, so the pool is centred before ``ahead`` widens it)
    pool: str = "max"  # "max" or "avg" (the paper's) over the kernel's neighbours
    ahead: int | None = None  # max pool only: this many more entries after the kernel's right
    # edge; None: 2 with max (measured, docs/scoring.md), 0 with avg

    def __post_init__(self) -> None:
        super().__post_init__()
        self.window = integer(self, "window", self.window, minimum=0)
        self.kernel = odd_width(self, "kernel", self.kernel)
        self.pool = choice(self, "pool", self.pool, ("avg", "max"))
        if self.ahead is None:
            self.ahead = 2 if self.pool == "max" else 0
        self.ahead = integer(self, "ahead", self.ahead, minimum=0)
        if self.ahead and self.pool != "max":
            raise KvcliError(f"snapkv: option ahead needs pool=max, got pool={self.pool}")

    @property
    def needs_scores(self) -> bool:
        return True

    def importance(self, layer: GrowingLayer) -> torch.Tensor:
        """The observation's attention, pooled over neighbouring entries."""
        return pool_scores(layer.require("obs"), self.kernel, self.pool, self.ahead or 0)

    def protected_entries(self, target: int) -> int:
        return self.n_sink + self.window

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        layer.gather(keep_top(self.importance(layer), target, self.n_sink, self.window))
