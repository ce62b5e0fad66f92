"""``cam``: Cache Merging (CaM, ICML 2024).

Entries are evicted H2O-style (accumulated attention, a ``recent`` share of the budget kept
as the recent window, half by default); an evicted entry's value is not dropped but merged
into the values of the next kept entries: scaled
by p = clamp(score / mean score of the recent window, 0, 1) and spread evenly over the
next ``spread`` kept entries (32 in the official code).  Keys are not merged.  Vectorized
with a difference array over kept-entry order (no loop per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Method, fraction, integer, keep_top

if TYPE_CHECKING:
    import torch

    from ..cache import GrowingLayer


@dataclass
class CaM(Method):
    name: ClassVar[str] = "cam"
    description: ClassVar[str] = "CaM: H2O eviction, evicted values merged into next kept entries"

    recent: float = 0.5  # share of the budget kept as the recent window
    spread: int = 32  # kept entries an evicted value is spread over

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recent = fraction(self, "recent", self.recent)
        self.spread = integer(self, "spread", self.spread, minimum=1)

    @property
    def needs_scores(self) -> bool:
        return True

    def importance(self, layer: GrowingLayer) -> torch.Tensor:
        return layer.require("scores")

    def protected_entries(self, target: int) -> int:
        return self.n_sink + int(target * self.recent)

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        import torch  # here, not at the top: checking options needs no torch

        scores = layer.require("scores")
        b, h, n = scores.shape
        n_recent = max(1, int(target * self.recent))
        keep = keep_top(scores, target, self.n_sink, n_recent)
        kept = torch.zeros((b, h, n), dtype=torch.bool, device=scores.device)
        kept.scatter_(2, keep, True)
        recent_mean = scores[..., -n_recent:].mean(dim=-1, keepdim=True).clamp_min(1e-12)
        prob = (scores / recent_mean).clamp(0, 1) * (~kept)
        # Rank of the first kept entry after each evicted entry (in kept order).
        rank = torch.cumsum(kept.long(), dim=-1)  # kept entries at or before i
        start = rank  # evicted i: next kept has rank index == rank[i]
        values = layer.require("values").float()
        contrib = values * (prob / self.spread).unsqueeze(-1)
        diff = torch.zeros((b, h, target + 1, values.shape[-1]), dtype=torch.float32, device=values.device)
        evicted = ~kept
        s = start.clamp(max=target)
        e = (start + self.spread).clamp(max=target)
        zero = torch.zeros_like(contrib)
        diff.scatter_add_(2, s.unsqueeze(-1).expand_as(contrib), torch.where(evicted.unsqueeze(-1), contrib, zero))
        diff.scatter_add_(2, e.unsqueeze(-1).expand_as(contrib), torch.where(evicted.unsqueeze(-1), -contrib, zero))
        add = torch.cumsum(diff, dim=2)[:, :, :target]
        layer.gather(keep)
        layer.values = (layer.values.float() + add).to(layer.values.dtype)
