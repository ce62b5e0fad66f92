"""The one interface every compression method implements.

A method decides what a growing layer keeps or merges; it never allocates cache storage
itself: it rewrites a layer through ``GrowingLayer.gather`` (eviction) or
``GrowingLayer.assign`` (merging).  ``compress`` runs after every prefill chunk.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.budget import Budget
from ..cache import GrowingLayer, KVCache


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_scores: ClassVar[bool] = False  # attention statistics from the observation window
    count_bias: ClassVar[bool] = False  # add log(count) to merged entries' logits
    uses_budget: bool = True  # False: the method's saving is structural (plain PoD); --budget is ignored
    stores_counts: ClassVar[bool] = False  # entries may stand for several tokens (merging)

    def __init__(self, n_sink: int = 4, **options) -> None:
        if options:
            raise TypeError(f"unknown option(s) for {self.name}: {', '.join(sorted(options))}")
        self.n_sink = n_sink

    def options(self) -> dict:
        """The method's settings, as reported in ``--json``."""
        return {"n_sink": self.n_sink}

    def compress(self, cache: KVCache, budget: Budget) -> None:
        target = budget.target(cache.seen)
        for layer in cache.growing_layers:
            if layer.length > target:
                self.compress_layer(layer, target)

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        raise NotImplementedError


def protected_scores(scores: torch.Tensor, n_sink: int, n_recent: int) -> torch.Tensor:
    """Scores with sinks and the recent window set to +inf so top-k always keeps them."""
    scores = scores.clone()
    scores[..., :n_sink] = float("inf")
    if n_recent > 0:
        scores[..., -n_recent:] = float("inf")
    return scores


def keep_top(scores: torch.Tensor, target: int, n_sink: int, n_recent: int) -> torch.Tensor:
    """Indices ``[B, H, target]`` (sorted) of the entries to keep: protected ones plus the
    highest-scored of the rest.  Sinks/recent shrink when the target is smaller."""
    n_sink = min(n_sink, target)
    n_recent = max(0, min(n_recent, target - n_sink))
    idx = torch.topk(protected_scores(scores, n_sink, n_recent), target, dim=-1).indices
    return idx.sort(dim=-1).values
