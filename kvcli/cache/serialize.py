"""A cache's contents as named tensors, and back: what a saved context (``.kvc``) stores.

Every layer keeps what it holds after prefill, nothing recomputed: a growing layer its keys,
values and per-entry metadata (logical positions, merge counts, attention statistics), a PoD
member (``SharedKeyLayer``) its own proximal keys and its values (the distant keys it reads
are its anchor's), a sliding-window layer its window and the tokens it has seen.  Restoring
checks every tensor against the cache the model builds (kinds, heads, head size, dtype,
lengths, positions), so a file that does not fit the model is a one-line ``KvcliError``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.errors import KvcliError
from .kvcache import KVCache
from .layers import GrowingLayer, SharedKeyLayer, WindowLayer

#: Per-entry metadata a growing layer may hold (absent: not materialised), and its dtype.
METADATA = {"positions": torch.long, "counts": torch.float32, "scores": torch.float32, "obs": torch.float32}


def _kind(layer: Any) -> str:
    if isinstance(layer, WindowLayer):
        return "window"
    return "shared" if isinstance(layer, SharedKeyLayer) else "growing"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def cache_state(cache: KVCache) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """``(tensors, layers)``: the cache's tensors named ``layers.{i}.{what}`` (on the CPU),
    and per layer its kind and length (window layers: tokens seen)."""
    tensors: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    for i, layer in enumerate(cache.kv_layers):
        prefix = f"layers.{i}."
        kind = _kind(layer)
        if not layer.is_initialized:
            raise RuntimeError(f"layer {i} holds nothing: only a prefilled cache can be saved")
        if isinstance(layer, WindowLayer):
            layers.append({"kind": kind, "seen": layer.seen})
            tensors[prefix + "keys"], tensors[prefix + "values"] = _cpu(layer.keys), _cpu(layer.values)
            continue
        layers.append({"kind": kind, "length": layer.length})
        if isinstance(layer, SharedKeyLayer):
            tensors[prefix + "head_keys"], tensors[prefix + "tail_keys"] = _cpu(layer.head_keys), _cpu(layer.tail_keys)
        else:
            tensors[prefix + "keys"] = _cpu(layer.require("keys"))
        tensors[prefix + "values"] = _cpu(layer.require("values"))
        for name in METADATA:
            t = layer.valid(name)
            if t is not None:
                tensors[prefix + name] = _cpu(t)
    return tensors, layers


class _Reader:
    """Takes tensors from a saved state, each checked (shape, dtype), none left over."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device, name: str) -> None:
        self.tensors, self.device, self.name = tensors, device, name
        self.used: set[str] = set()

    def bad(self, why: str) -> KvcliError:
        return KvcliError(f"{self.name}: does not fit this model's cache ({why})")

    def take(self, key: str, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise self.bad(f"tensor {key} is missing")
        got = tuple(t.shape)
        if (
            t.dtype != dtype
            or len(got) != len(shape)
            or any(s is not None and s != g for s, g in zip(shape, got, strict=True))
        ):
            want = "x".join("*" if s is None else str(s) for s in shape)
            raise self.bad(
                f"tensor {key} is {str(t.dtype).removeprefix('torch.')} {list(got)}, "
                f"expected {str(dtype).removeprefix('torch.')} [{want}]"
            )
        self.used.add(key)
        return t.to(self.device)

    def maybe(self, key: str, shape: tuple[int | None, ...], dtype: torch.dtype) -> torch.Tensor | None:
        return self.take(key, shape, dtype) if key in self.tensors else None


def restore_cache(
    cache: KVCache,
    tensors: dict[str, torch.Tensor],
    layers: list[Any],
    seen: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
) -> None:
    """Fill a fresh ``cache`` (the method attached, nothing forwarded) from ``cache_state``'s
    output; ``seen``: the logical tokens of the context.  ``name`` goes in error messages."""
    read = _Reader(tensors, device, name)
    if len(layers) != len(cache.kv_layers):
        raise read.bad(f"{len(layers)} layers saved, the model has {len(cache.kv_layers)}")
    if seen < 1:
        raise read.bad("no tokens")
    h, d = cache.num_kv_heads, cache.head_dim
    for i, (layer, meta) in enumerate(zip(cache.kv_layers, layers, strict=True)):
        kind = _kind(layer)
        if not isinstance(meta, dict) or meta.get("kind") != kind:
            got = meta.get("kind") if isinstance(meta, dict) else meta
            raise read.bad(f"layer {i} is {got!r}, this model and method make it {kind!r}")
        prefix = f"layers.{i}."
        if isinstance(layer, WindowLayer):
            _restore_window(layer, read, prefix, meta, seen, dtype, (h, d))
        else:
            _restore_growing(layer, read, prefix, meta, seen, dtype, (h, d))
    for layer in cache.kv_layers:
        if isinstance(layer, SharedKeyLayer) and layer.anchor.length != layer.length:
            raise read.bad(f"layer {layer.layer_idx} and its PoD anchor hold different entries")
    extra = sorted(set(tensors) - read.used)
    if extra:
        raise read.bad(f"unexpected tensor {extra[0]}")
    cache.seen = seen


def _length(read: _Reader, meta: dict, key: str, limit: int) -> int:
    n = meta.get(key)
    if type(n) is not int or not 1 <= n <= limit:
        raise read.bad(f"layer {key} {n!r} is not in [1, {limit}]")
    return n


def _restore_window(
    layer: WindowLayer, read: _Reader, prefix: str, meta: dict, seen: int, dtype: torch.dtype, hd: tuple[int, int]
) -> None:
    if meta.get("seen") != seen:
        raise read.bad(f"window layer {layer.layer_idx} saw {meta.get('seen')!r} tokens, the context has {seen}")
    n = min(seen, max(layer.sliding_window - 1, 0))
    keys = read.take(prefix + "keys", (1, hd[0], n, hd[1]), dtype)
    values = read.take(prefix + "values", (1, hd[0], n, None), dtype)
    layer.dtype, layer.device = dtype, keys.device
    layer.keys, layer.values, layer.seen = keys, values, seen
    layer.is_initialized = True


def _restore_growing(
    layer: GrowingLayer, read: _Reader, prefix: str, meta: dict, seen: int, dtype: torch.dtype, hd: tuple[int, int]
) -> None:
    h, d = hd
    n = _length(read, meta, "length", seen)
    values = read.take(prefix + "values", (1, h, n, None), dtype)
    if isinstance(layer, SharedKeyLayer):
        head = read.take(prefix + "head_keys", (1, h, None, d), dtype)
        tail = read.take(prefix + "tail_keys", (1, h, None, d), dtype)
        if head.shape[2] > layer.n_head_max or head.shape[2] + tail.shape[2] > n:
            raise read.bad(f"layer {layer.layer_idx}: its proximal keys do not fit its entries")
        layer.head_keys, layer.tail_keys = head, tail
        layer.keys = None  # type: ignore[assignment]  # a member's distant keys are its anchor's
    else:
        layer.keys = read.take(prefix + "keys", (1, h, n, d), dtype)
    meta_t = {key: read.maybe(prefix + key, (1, h, n), dt) for key, dt in METADATA.items()}
    pos = meta_t["positions"]
    if pos is None and n != seen:
        raise read.bad(f"layer {layer.layer_idx} holds {n} of {seen} entries but no positions")
    if pos is not None and n and (int(pos.min()) < 0 or int(pos.max()) >= seen):
        raise read.bad(f"layer {layer.layer_idx}: positions outside the context")
    counts = meta_t["counts"]
    if counts is not None and not bool((counts > 0).all()):
        raise read.bad(f"layer {layer.layer_idx}: merge counts must be positive")
    layer.dtype, layer.device = dtype, values.device
    layer.values = values
    layer.positions, layer.counts, layer.scores, layer.obs = pos, counts, meta_t["scores"], meta_t["obs"]
    layer.length = n
    layer.is_initialized = True
