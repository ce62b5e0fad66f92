"""KV-cache memory from a model configuration alone (no weights): ``kvcli profile --estimate``.

Why a simulation and not a formula: the cache's size depends on its history (metadata
appears only once a layer has been compressed, budgets are applied after every chunk), so
the estimator replays the chunk loop of ``Engine.prefill`` on entry counts and prices each
layer exactly as ``kvcli/cache.py`` stores it (batch 1):

* growing layers (full attention): ``min(target, seen)`` entries of K and V per KV head
  (model dtype), plus per-entry ``[H]`` metadata: ``positions`` (int64) once the layer has
  been compressed, ``counts`` (float32) for methods that store merge counts once
  compressed, ``scores`` and ``obs`` (float32) whenever the method needs attention
  statistics and the budget is not full;
* sliding-window layers: the last ``window - 1`` entries of K and V, nothing else.

A method whose saving is structural (``uses_budget`` False, plain PoD) runs at a full budget,
as in the ``Engine``.

The hook for methods whose storage differs (e.g. PoD sharing distant keys across layers):

    def estimate_layers(self, shape: CacheShape, step: EstimateStep,
                        default: list[LayerEstimate]) -> list[LayerEstimate]

on the method class, returning the per-layer bytes at one moment of the prefill (``default``
is what the rule above gives).  It is called on one fresh instance (``make_method(name,
**options)``) for every moment in order: after each chunk's forward (``step.compressed``
False) and after the method ran (True), so it may keep state between calls.  The result
equals ``Context.report()`` byte for byte (tests/test_profile.py checks every method).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import torch

from .budget import FULL, Budget, parse_budget
from .errors import KvcliError

DEFAULT_CHUNK = 512
_INT64, _FLOAT32 = 8, 4
# Methods that materialise per-entry merge counts, for method classes that do not say so
# themselves with a ``stores_counts`` class attribute.
_STORES_COUNTS = frozenset({"kvmerger"})
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


@dataclass(frozen=True)
class CacheShape:
    """What the cache's size depends on, read from a model configuration."""

    layer_kinds: tuple[str, ...]  # per layer: "growing" (full attention) or "sliding"
    sliding_window: int | None
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    batch: int = 1
    config: object = field(default=None, compare=False, repr=False)  # the text config, for method hooks

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
        return {"layer": self.layer, "kind": self.kind, "entries": self.entries, "keys": self.keys,
                "values": self.values, "positions": self.positions, "counts": self.counts,
                "scores": self.scores, "obs": self.obs, "extra": self.extra, "bytes": self.bytes}


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


# ---- configuration ---------------------------------------------------------------------------
def load_config(ref: str | Path):
    """A model configuration from ``config.json`` or a model directory, without weights.

    Transformers' own config class is used when it knows the model type (it derives fields
    such as ``layer_types`` exactly as a loaded model would); otherwise the raw JSON.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise KvcliError(f"--model {ref}: directory has no config.json")
    elif not path.is_file():
        raise KvcliError(f"--model {ref}: no such file or directory (give a config.json or a model directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvcliError(f"--model {ref}: cannot read {path.name} as JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise KvcliError(f"--model {ref}: {path.name} is not a JSON object")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path))
    except Exception:  # unknown model_type or a partial config: read the fields ourselves
        return data


def _text_config(config):
    if isinstance(config, dict):
        config = config.get("text_config") or config
        return SimpleNamespace(**config)
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def _field(cfg, name: str):
    return getattr(cfg, name, None)


def cache_shape(config, dtype: torch.dtype | str) -> CacheShape:
    """The cache layout ``KVCache.__init__`` builds for ``config`` (mirrors it exactly)."""
    cfg = _text_config(config)
    try:
        n = int(_field(cfg, "num_hidden_layers"))
        heads = int(_field(cfg, "num_attention_heads"))
    except (TypeError, ValueError):
        raise KvcliError("model configuration: needs num_hidden_layers and num_attention_heads") from None
    kv_heads = _field(cfg, "num_key_value_heads") or heads
    head_dim = _field(cfg, "head_dim")
    if not head_dim:
        hidden = _field(cfg, "hidden_size")
        if not hidden:
            raise KvcliError("model configuration: needs head_dim or hidden_size")
        head_dim = int(hidden) // heads
    types = list(_field(cfg, "layer_types") or ["full_attention"] * n)
    window = _field(cfg, "sliding_window")
    kinds = tuple("sliding" if t in ("sliding_attention", "chunked_attention") and window else "growing"
                  for t in types[:n])
    return CacheShape(layer_kinds=kinds, sliding_window=int(window) if window else None,
                      num_kv_heads=int(kv_heads), head_dim=int(head_dim), dtype=resolve_dtype(dtype), config=cfg)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise KvcliError(f"invalid dtype {dtype!r}: use float32, bfloat16 or float16")
    return _DTYPES[name]


# ---- the default storage model ------------------------------------------------------------------
def make_estimating_method(method, options: dict | None = None):
    """A fresh method instance (estimates may keep state on it) from a name or an instance."""
    from .methods import make_method

    if isinstance(method, str):
        return make_method(method, **dict(options or {}))
    return method


def _compresses(meth) -> bool:
    from .methods.full import FullCache

    return not isinstance(meth, FullCache)


def _stores_counts(meth) -> bool:
    return bool(getattr(meth, "stores_counts", meth.name in _STORES_COUNTS))


def growing_layer(shape: CacheShape, layer: int, entries: int, positions: bool, counts: bool,
                  stats: bool) -> LayerEstimate:
    """Bytes of a ``GrowingLayer`` holding ``entries`` with the given metadata present."""
    kv = entries * shape.kv_entry_bytes // 2
    meta = entries * shape.meta_elements
    return LayerEstimate(layer=layer, kind="growing", entries=entries, keys=kv, values=kv,
                         positions=meta * _INT64 if positions else 0, counts=meta * _FLOAT32 if counts else 0,
                         scores=meta * _FLOAT32 if stats else 0, obs=meta * _FLOAT32 if stats else 0)


def window_layer(shape: CacheShape, layer: int, seen: int) -> LayerEstimate:
    """Bytes of a ``WindowLayer`` after ``seen`` tokens: its last ``window - 1`` entries."""
    entries = min(seen, shape.sliding_window - 1)
    kv = entries * shape.kv_entry_bytes // 2
    return LayerEstimate(layer=layer, kind="sliding", entries=entries, keys=kv, values=kv)


def default_layers(shape: CacheShape, meth, step: EstimateStep) -> list[LayerEstimate]:
    """Per-layer bytes at ``step`` for a method that only evicts/merges within each layer."""
    stats = bool(meth.needs_scores) and not step.budget.is_full
    out = []
    for i, kind in enumerate(shape.layer_kinds):
        if kind == "sliding":
            out.append(window_layer(shape, i, step.seen))
        else:
            out.append(growing_layer(shape, i, step.length, positions=step.was_compressed,
                                     counts=step.was_compressed and _stores_counts(meth), stats=stats))
    return out


def _layers(shape: CacheShape, meth, step: EstimateStep) -> list[LayerEstimate]:
    layers = default_layers(shape, meth, step)
    hook = getattr(meth, "estimate_layers", None)
    if hook is not None:
        layers = hook(shape, step, layers)
    return layers


def full_bytes(shape: CacheShape, seen: int) -> int:
    """``KVCache.full_bytes``: an uncompressed cache's K and V after ``seen`` tokens."""
    total = 0
    for kind in shape.layer_kinds:
        n = seen if kind == "growing" else min(seen, shape.sliding_window - 1)
        total += n * shape.kv_entry_bytes
    return total


def estimate_kv_bytes(config, context_tokens: int, method, budget: Budget | float | str, dtype: torch.dtype | str,
                      chunk_size: int | None = None, method_options: dict | None = None) -> dict:
    """KV-cache bytes after prefilling ``context_tokens`` with ``method`` at ``budget``.

    ``config``: a transformers config, a ``config.json`` dict or anything with its fields.
    Returns the keys of ``Context.report()`` that concern memory (``kv_bytes``,
    ``kv_bytes_full``, ``kv_ratio``, ``kv_bytes_all_layers``, ``kept_tokens``,
    ``compressed_layers``) plus ``per_layer`` (bytes by tensor), ``peak_prefill_kv_bytes``
    (the largest cache at a chunk boundary, as ``PrefillStats.max_cache_bytes``) and
    ``trace`` (per chunk, as ``PrefillStats.trace``).
    """
    if not isinstance(budget, Budget):
        budget = parse_budget(budget)
    chunk_size = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk_size < 1:
        raise KvcliError(f"invalid chunk size {chunk_size}: it must be a positive integer")
    if int(context_tokens) < 1:
        raise KvcliError(f"invalid context length {context_tokens}: it must be a positive number of tokens")
    context_tokens = int(context_tokens)
    meth = make_estimating_method(method, method_options)
    if not meth.uses_budget:  # as the Engine: a structural saving only (plain PoD), no token budget
        budget = FULL
    shape = cache_shape(config, dtype)
    compresses = _compresses(meth)
    base = EstimateStep(seen=0, chunk=0, chunk_size=chunk_size, budget=budget, options=dict(method_options or {}))

    seen = length = 0
    was_compressed = False
    peak = 0
    trace: list[dict] = []
    layers: list[LayerEstimate] = []
    while seen < context_tokens:
        chunk = min(chunk_size, context_tokens - seen)
        seen += chunk
        length += chunk
        before = replace(base, seen=seen, chunk=chunk, compressed=False, length=length, was_compressed=was_compressed)
        peak = max(peak, sum(l.bytes for l in _layers(shape, meth, before)))
        target = budget.target(seen)
        if compresses and length > target:
            length, was_compressed = target, True
        after = replace(before, compressed=True, length=length, was_compressed=was_compressed)
        layers = _layers(shape, meth, after)
        trace.append({"tokens": seen, "kv_bytes": sum(l.bytes for l in layers)})

    total = sum(l.bytes for l in layers)
    full = full_bytes(shape, seen)
    growing = shape.growing_indices
    return {
        "estimate": True,
        "method": meth.name,
        "method_options": meth.options(),
        "budget": str(budget),
        "dtype": str(shape.dtype).removeprefix("torch."),
        "context_tokens": context_tokens,
        "chunk_size": chunk_size,
        "kv_bytes": total,
        "kv_bytes_full": full,
        "kv_ratio": total / full if full else 1.0,
        "compressed_layers": growing,
        "kv_bytes_per_layer": [layers[i].bytes for i in growing],
        "kv_bytes_all_layers": [l.bytes for l in layers],
        "kept_tokens": [layers[i].entries for i in growing],
        "per_layer": [l.as_dict() for l in layers],
        "peak_prefill_kv_bytes": peak,
        "trace": trace,
    }
