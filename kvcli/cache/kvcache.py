"""The cache object transformers sees: one layer object per model layer, and its accounting."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from transformers.cache_utils import Cache

from .layers import Clock, GrowingLayer, WindowLayer
from .sizing import cache_shape, full_bytes


@dataclass
class CacheReport:
    """Bytes held, counted from the tensors."""

    kv_bytes: int
    kv_bytes_full: int
    per_layer: list[int]
    kept_tokens: list[int]
    compressed_layers: list[int]


class KVCache(Cache):
    """kvcli's cache: growing or sliding-window layers, as ``sizing.cache_shape`` reads the config."""

    def __init__(self, config: Any) -> None:
        self.shape = cache_shape(config)
        self.clock = Clock()
        self.config_ref = self.shape.config
        layers: list[Any] = []
        for i, kind in enumerate(self.shape.layer_kinds):
            if kind == "sliding":
                layers.append(WindowLayer(self.clock, i, self.shape.sliding_window or 0))
            else:
                layers.append(GrowingLayer(self.clock, i))
        super().__init__(layers=layers)
        self.seen = 0  # logical tokens processed
        self.num_kv_heads = self.shape.num_kv_heads
        self.head_dim = self.shape.head_dim
        self.sliding_window = self.shape.sliding_window

    # ---- engine side ----------------------------------------------------------------------
    def begin_forward(self, positions: torch.Tensor) -> None:
        """Announce the logical positions ``[Lq]`` of the tokens about to be forwarded."""
        self.clock.positions = positions

    def end_forward(self, n_tokens: int) -> None:
        self.seen += n_tokens

    @property
    def kv_layers(self) -> list[GrowingLayer | WindowLayer]:
        """``layers``, typed: every layer is one kvcli built (PoD swaps in ``SharedKeyLayer``s)."""
        return cast("list[GrowingLayer | WindowLayer]", self.layers)

    @property
    def growing_layers(self) -> list[GrowingLayer]:
        return [layer for layer in self.kv_layers if isinstance(layer, GrowingLayer)]

    @property
    def growing_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.kv_layers) if isinstance(layer, GrowingLayer)]

    @property
    def detachable(self) -> bool:
        """Whether a pass can run detached (``Clock.detached``): no layer's entries are read
        through another's (PoD members are not)."""
        return all(layer.detachable for layer in self.growing_layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reserve(self, extra: int) -> None:
        for layer in self.kv_layers:
            layer.reserve(extra)

    def compact(self) -> None:
        for layer in self.kv_layers:
            layer.compact()

    def checkpoint(self) -> dict:
        return {"seen": self.seen, "layers": [layer.checkpoint() for layer in self.kv_layers]}

    def rollback(self, state: dict) -> None:
        self.seen = state["seen"]
        for layer, s in zip(self.kv_layers, state["layers"], strict=True):
            layer.rollback(s)

    # ---- accounting -------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.kv_layers)

    def full_bytes(self, dtype: torch.dtype) -> int:
        """What an uncompressed cache would hold for the tokens seen so far."""
        return full_bytes(replace(self.shape, dtype=dtype), self.seen)

    def report(self, dtype: torch.dtype) -> CacheReport:
        return CacheReport(
            kv_bytes=self.nbytes(),
            kv_bytes_full=self.full_bytes(dtype),
            per_layer=[layer.nbytes() for layer in self.kv_layers],
            kept_tokens=[layer.length for layer in self.growing_layers],
            compressed_layers=self.growing_indices,
        )
