"""The one interface every compression method implements, and the checks its options share.

A method is a small dataclass: its fields are its options (``options()`` reads them), each
checked in ``__post_init__`` with a one-line ``KvcliError`` naming the option, so a bad
option fails when the method is made, before any model loads.  It decides what a growing
layer keeps or merges; it never allocates cache storage itself: it rewrites a layer
through ``GrowingLayer.gather`` (eviction) or ``GrowingLayer.assign`` (merging).
``compress`` runs after every prefill chunk.  The optional hooks (``attach``,
``estimate_layers``) are declared here with defaults that do nothing.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from ..core import defaults
from ..core.budget import Budget
from ..core.errors import KvcliError
from .allocation import Ranked, global_targets

if TYPE_CHECKING:  # annotations only: a method (and its option checks) imports without torch
    import torch

    from ..attention import RunState
    from ..cache import GrowingLayer, KVCache
    from ..cache.sizing import CacheShape, EstimateStep, LayerEstimate

#: ``field`` metadata of a dataclass field that is not an option (state, or an inner method).
NOT_AN_OPTION = {"option": False}


def state(default_factory: Any) -> Any:
    """A field for what a method learns while it runs (not an option, not compared)."""
    return field(init=False, repr=False, compare=False, default_factory=default_factory, metadata=NOT_AN_OPTION)


@dataclass
class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    compresses: ClassVar[bool] = True  # False: keeps everything (the full cache)
    #: What the ``auto`` allocation (the default) means for a method that ranks entries: the
    #: one measured best for it (docs/scoring.md, "The relative allocation").
    allocation: ClassVar[str] = "heads"

    n_sink: int = defaults.N_SINK
    #: ``relative``'s history of evicted scores, one per cache the method compresses.
    _ranked: weakref.WeakKeyDictionary = state(weakref.WeakKeyDictionary)

    def __post_init__(self) -> None:
        self.n_sink = integer(self, "n_sink", self.n_sink, minimum=0)

    # ---- what the engine and the estimate ask -------------------------------------------
    @property
    def label(self) -> str:
        """The name reports use (``pod+kvmerger`` for a composite)."""
        return self.name

    @property
    def needs_scores(self) -> bool:
        """Attention statistics from the observation window (the cache collects them)."""
        return False

    @property
    def count_bias(self) -> bool:
        """Add log(count) to merged entries' logits."""
        return False

    @property
    def stores_counts(self) -> bool:
        """Entries may stand for several tokens (merging)."""
        return False

    @property
    def uses_budget(self) -> bool:
        """False: the saving is structural (plain PoD) and the token budget does not apply."""
        return True

    @property
    def ranks_entries(self) -> bool:
        """``importance`` ranks a layer's entries, so the budget can be allocated across layers."""
        return self.needs_scores

    def budget_for(self, budget: Budget) -> Budget:
        """``budget`` as this method runs it: one that ranks nothing (streaming, plain PoD,
        PoD with a scored inner method) shares it uniformly whatever the allocation says;
        ``auto`` becomes the method's own ``allocation``."""
        if not self.ranks_entries:
            wanted = "uniform"
        elif budget.allocation == "auto":
            wanted = self.allocation
        else:
            return budget
        return replace(budget, allocation=wanted)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata.get("option", True)]

    def options(self) -> dict:
        """The method's settings, as reported in ``--json``."""
        return {name: getattr(self, name) for name in self.option_names()}

    # ---- hooks ------------------------------------------------------------------------------
    def attach(self, cache: KVCache, state: RunState) -> None:
        """Called once when a run starts, before the first forward (e.g. to swap layer storage)."""
        return None

    def estimate_layers(
        self, shape: CacheShape, step: EstimateStep, default: list[LayerEstimate]
    ) -> list[LayerEstimate]:
        """Per-layer bytes at one moment of a prefill, for ``kvcli profile --estimate``.

        ``default`` prices layers that only evict or merge within themselves; a method whose
        storage differs returns its own.  Called on one fresh instance for every moment in
        order, so it may keep state between calls."""
        return default

    # ---- after every chunk --------------------------------------------------------------------
    def compress(self, cache: KVCache, budget: Budget) -> None:
        budget = self.budget_for(budget)  # the engine's is already; a direct caller's may say "auto"
        target = budget.target(cache.seen)
        layers = cache.growing_layers
        if all(layer.length <= target for layer in layers):
            return  # within budget everywhere (always so at the full budget, which scores nothing)
        ranked = None
        if budget.allocation != "uniform" and self.ranks_entries:
            importance = [self.importance(layer) for layer in layers]
            floor = min(target, self.protected_entries(target))
            means = None
            if budget.allocation == "relative":  # each head's mean over all it has ranked
                ranked = self._ranked.setdefault(cache, Ranked())
                means = ranked.means([layer.layer_idx for layer in layers], importance)
            targets = global_targets(importance, target, floor, budget.allocation, means)
        else:
            targets = [target] * len(layers)
        for i, (layer, keep) in enumerate(zip(layers, targets, strict=True)):
            if layer.length > keep:
                self.compress_layer(layer, keep)
                if ranked is not None:
                    ranked.evicted(layer.layer_idx, importance[i], self.importance(layer))

    def ranked_history(self, cache: KVCache) -> Ranked | None:
        """``relative``'s history for ``cache`` (None before its first ranked compression)."""
        return self._ranked.get(cache)

    def resume_ranked(self, cache: KVCache, ranked: Ranked) -> None:
        """Go on from ``ranked`` for ``cache`` (a context reloaded from a file)."""
        self._ranked[cache] = ranked

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        raise NotImplementedError

    def importance(self, layer: GrowingLayer) -> torch.Tensor:
        """``[B, H, n]``: what ``compress_layer`` ranks the layer's entries by (scored methods)."""
        raise NotImplementedError(f"{self.name} does not rank entries")

    def protected_entries(self, target: int) -> int:
        """Entries a layer keeps whatever their rank (sinks, recent window) at ``target``."""
        return self.n_sink


# ---- option checks (one line each, naming the method and the option) ----------------------------
def _bad(method: Method, name: str, want: str, value: Any) -> KvcliError:
    return KvcliError(f"{method.name}: option {name} must be {want}, got {value!r}")


def integer(method: Method, name: str, value: Any, minimum: int | None = None) -> int:
    """An integer option: ints, and floats without a fraction (``16.0``); never bools or text."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool):
        raise _bad(method, name, "an integer", value)
    try:
        out = operator.index(value)
    except TypeError:
        raise _bad(method, name, "an integer", value) from None
    if minimum is not None and out < minimum:
        raise _bad(method, name, f"an integer >= {minimum}", value)
    return out


def odd_width(method: Method, name: str, value: Any) -> int:
    """A pooling width: an odd positive integer, so the window is centred on its entry."""
    out = integer(method, name, value)
    if out < 1 or out % 2 == 0:
        raise _bad(method, name, "an odd positive integer", value)
    return out


def number(
    method: Method, name: str, value: Any, low: float | None = None, high: float | None = None, positive: bool = False
) -> float:
    """A real-number option in ``[low, high]`` (``positive``: above 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(method, name, "a number", value)
    out = float(value)
    if positive and not out > 0:
        raise _bad(method, name, "a positive number", value)
    if (low is not None and out < low) or (high is not None and out > high):
        raise _bad(method, name, f"a number in [{low:g}, {high:g}]", value)
    return out


def fraction(method: Method, name: str, value: Any) -> float:
    """A share in [0, 1] (of the budget, or of the tokens seen)."""
    return number(method, name, value, 0.0, 1.0)


def choice(method: Method, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise _bad(method, name, " or ".join(repr(c) for c in choices), value)
    return str(value)


# ---- shared selection -----------------------------------------------------------------------------
def pool_scores(scores: torch.Tensor, kernel: int, pool: str = "max", ahead: int = 0) -> torch.Tensor:
    """Scores ``[..., n]`` pooled over neighbouring entries: entry i takes the maximum (or
    the mean, ``pool="avg"``) of entries ``i - kernel//2 .. i + kernel//2 + ahead``.  With
    ``max`` an entry next to a high-scored one scores as high, so a kept entry keeps its
    context; ``ahead`` reaches further right than left (a copied span's first entries score
    lowest under reconstruction, docs/scoring.md).  ``kernel`` 1 and ``ahead`` 0: unchanged."""
    import torch.nn.functional as F  # here, not at the top: checking options needs no torch

    if kernel == 1 and not ahead:
        return scores
    shape, n = scores.shape, scores.shape[-1]
    flat = scores.reshape(-1, 1, n)
    if pool == "max":
        half = kernel // 2
        padded = F.pad(flat, (half, half + ahead), value=float("-inf"))
        pooled = F.max_pool1d(padded, kernel + ahead, stride=1)
    else:
        if ahead:
            raise ValueError("pool_scores: ahead needs pool='max'")
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return pooled.reshape(shape)


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
    idx = protected_scores(scores, n_sink, n_recent).topk(target, dim=-1).indices
    return idx.sort(dim=-1).values
