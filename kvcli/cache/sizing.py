"""The cache's byte and shape arithmetic, from a model configuration alone.

``KVCache`` builds its layers from ``cache_shape`` and counts an uncompressed cache with
``full_bytes``; the memory estimate (``kvcli.profile.estimate``) and methods whose storage
differs (PoD's estimate hook) price layers with ``growing_layer`` / ``window_layer``.  One
module, so the cache and its estimate cannot drift apart.

Prices, batch 1, as ``kvcli.cache.layers`` stores them:

* growing layers (full attention): entries of K and V per KV head (model dtype), plus
  per-entry ``[H]`` metadata: ``positions`` (int64) once the layer has been compressed,
  ``counts`` (float32) for methods that store merge counts once compressed, ``scores``
  and ``obs`` (float32) whenever the method needs attention statistics;
* sliding-window layers: the last ``window - 1`` entries of K and V, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from ..core.budget import Budget
from ..core.errors import KvcliError

INT64_BYTES, FLOAT32_BYTES = 8, 4
SLIDING_TYPES = ("sliding_attention", "chunked_attention")
DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True)
class CacheShape:
    """What the cache's size depends on, read from a model configuration."""

    layer_kinds: tuple[str, ...]  # per layer: "growing" (full attention) or "sliding"
    sliding_window: int | None
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    batch: int = 1
    config: Any = field(default=None, compare=False, repr=False)  # the text config, for method hooks

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_entry_bytes(self) -> int:
        """Bytes of one cache entry's key and value over all KV heads."""
        return self.batch * self.num_kv_heads * 2 * self.head_dim * self.element_size

    @property
    def meta_elements(self) -> int:
        """Elements per entry of a ``[B, H, n]`` metadata tensor."""
        return self.batch * self.num_kv_heads

    @property
    def growing_indices(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == "growing"]


@dataclass
class LayerEstimate:
    """Bytes one cache layer holds, by tensor (the fields of ``GrowingLayer``)."""

    layer: int
    kind: str  # "growing" | "sliding"
    entries: int  # entries per KV head
    keys: int = 0
    values: int = 0
    positions: int = 0
    counts: int = 0
    scores: int = 0
    obs: int = 0
    extra: int = 0  # storage a method adds to this layer (e.g. keys shared across layers)

    @property
    def bytes(self) -> int:
        return self.keys + self.values + self.positions + self.counts + self.scores + self.obs + self.extra

    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "entries": self.entries,
            "keys": self.keys,
            "values": self.values,
            "positions": self.positions,
            "counts": self.counts,
            "scores": self.scores,
            "obs": self.obs,
            "extra": self.extra,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class EstimateStep:
    """One moment of the prefill that an estimate describes.

    ``seen``: tokens processed so far; ``compressed``: False right after a chunk's forward
    (the moment ``PrefillStats.max_cache_bytes`` is taken), True after the method ran.
    ``length``: entries per growing layer at that moment under the default budget rule;
    ``was_compressed``: whether any compression had happened by then (metadata exists).
    """

    seen: int
    chunk: int  # tokens in the chunk just processed
    chunk_size: int
    budget: Budget
    options: dict = field(default_factory=dict)
    compressed: bool = True
    length: int = 0
    was_compressed: bool = False


# ---- configuration -----------------------------------------------------------------------------
def text_config(config: Any) -> Any:
    """The text part of a configuration (a transformers config, or a ``config.json`` dict)."""
    if isinstance(config, dict):
        return SimpleNamespace(**(config.get("text_config") or config))
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise KvcliError(f"dtype {dtype!r} is invalid: use float32, bfloat16 or float16", option="dtype")
    return DTYPES[name]


def cache_shape(config: Any, dtype: torch.dtype | str = torch.float32) -> CacheShape:
    """The cache layout for ``config``: which layers grow with the document, which slide."""
    cfg = text_config(config)
    try:
        n = int(getattr(cfg, "num_hidden_layers", None))  # type: ignore[arg-type]
        heads = int(getattr(cfg, "num_attention_heads", None))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KvcliError("model configuration: needs num_hidden_layers and num_attention_heads") from None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim:
        hidden = getattr(cfg, "hidden_size", None)
        if not hidden:
            raise KvcliError("model configuration: needs head_dim or hidden_size")
        head_dim = int(hidden) // heads
    types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    window = getattr(cfg, "sliding_window", None)
    kinds = tuple("sliding" if t in SLIDING_TYPES and window else "growing" for t in types[:n])
    return CacheShape(
        layer_kinds=kinds,
        sliding_window=int(window) if window else None,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype=resolve_dtype(dtype),
        config=cfg,
    )


# ---- prices ------------------------------------------------------------------------------------
def growing_layer(
    shape: CacheShape, layer: int, entries: int, positions: bool, counts: bool, stats: bool
) -> LayerEstimate:
    """Bytes of a ``GrowingLayer`` holding ``entries`` with the given metadata present."""
    kv = entries * shape.kv_entry_bytes // 2
    meta = entries * shape.meta_elements
    return LayerEstimate(
        layer=layer,
        kind="growing",
        entries=entries,
        keys=kv,
        values=kv,
        positions=meta * INT64_BYTES if positions else 0,
        counts=meta * FLOAT32_BYTES if counts else 0,
        scores=meta * FLOAT32_BYTES if stats else 0,
        obs=meta * FLOAT32_BYTES if stats else 0,
    )


def window_entries(shape: CacheShape, seen: int) -> int:
    """Entries a sliding-window layer holds after ``seen`` tokens: its last ``window - 1``."""
    return min(seen, (shape.sliding_window or 1) - 1)


def window_layer(shape: CacheShape, layer: int, seen: int) -> LayerEstimate:
    """Bytes of a ``WindowLayer`` after ``seen`` tokens."""
    entries = window_entries(shape, seen)
    kv = entries * shape.kv_entry_bytes // 2
    return LayerEstimate(layer=layer, kind="sliding", entries=entries, keys=kv, values=kv)


def full_bytes(shape: CacheShape, seen: int) -> int:
    """An uncompressed cache's K and V after ``seen`` tokens."""
    return sum(
        (seen if kind == "growing" else window_entries(shape, seen)) * shape.kv_entry_bytes
        for kind in shape.layer_kinds
    )
