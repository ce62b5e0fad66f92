"""KV-cache memory from a model configuration alone (no weights): ``kvcli profile --estimate``.

Why a simulation and not a formula: the cache's size depends on its history (metadata
appears only once a layer has been compressed, budgets are applied after every chunk), so
the estimator replays the chunk loop of ``Engine.prefill`` on entry counts and prices each
layer with ``kvcli.cache.sizing`` (the arithmetic the cache itself uses): growing layers
hold ``min(target, seen)`` entries, with metadata as the method and its history require;
sliding-window layers their last ``window - 1`` entries.

A method whose saving is structural (``uses_budget`` False, plain PoD) runs at a full budget,
as in the ``Engine``.

The hook for methods whose storage differs (e.g. PoD sharing distant keys across layers) is
``Method.estimate_layers(shape, step, default)``, returning the per-layer bytes at one moment
of the prefill (``default`` is what the rule above gives; the base class returns it).  It is
called on one fresh instance (``make_method(name, **options)``) for every moment in order:
after each chunk's forward (``step.compressed`` False) and after the method ran (True), so
it may keep state between calls.  The result
equals ``Context.report()`` byte for byte (tests/test_profile.py checks every method).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..cache.sizing import CacheShape, EstimateStep, LayerEstimate, cache_shape, full_bytes, growing_layer, window_layer
from ..core import defaults
from ..core.budget import FULL, Budget, parse_budget
from ..core.documents import load_document
from ..core.errors import KvcliError
from ..engine.engine import check_chunk_size
from ..engine.models import config_location, load_config
from ..methods import make_method
from ..methods.base import Method


def make_estimating_method(method: str | Method, options: dict | None = None) -> Method:
    """A fresh method instance (estimates may keep state on it) from a name or an instance."""
    if isinstance(method, str):
        return make_method(method, **dict(options or {}))
    return method


def default_layers(shape: CacheShape, meth: Method, step: EstimateStep) -> list[LayerEstimate]:
    """Per-layer bytes at ``step`` for a method that only evicts/merges within each layer."""
    stats = meth.needs_scores and not step.budget.is_full
    out = []
    for i, kind in enumerate(shape.layer_kinds):
        if kind == "sliding":
            out.append(window_layer(shape, i, step.seen))
        else:
            out.append(
                growing_layer(
                    shape,
                    i,
                    step.length,
                    positions=step.was_compressed,
                    counts=step.was_compressed and meth.stores_counts,
                    stats=stats,
                )
            )
    return out


def _layers(shape: CacheShape, meth: Method, step: EstimateStep) -> list[LayerEstimate]:
    return meth.estimate_layers(shape, step, default_layers(shape, meth, step))


@dataclass
class Estimate:
    """What ``estimate_kv_bytes`` finds: the memory keys of ``Context.report()`` plus the
    breakdown per layer, the peak during prefill and the per-chunk trace."""

    method: str
    method_options: dict
    budget: str
    dtype: str
    context_tokens: int
    chunk_size: int
    kv_bytes: int
    kv_bytes_full: int
    kv_ratio: float
    compressed_layers: list[int]
    kv_bytes_per_layer: list[int]
    kv_bytes_all_layers: list[int]
    kept_tokens: list[int]
    per_layer: list[LayerEstimate]  # bytes by tensor
    peak_prefill_kv_bytes: int  # the largest cache at a chunk boundary (``PrefillStats.max_cache_bytes``)
    trace: list[dict]  # per chunk, as ``PrefillStats.trace``
    model: str | None = None  # the configuration it was read from, when known

    def as_dict(self) -> dict:
        """The JSON object of ``kvcli profile --estimate --json``."""
        out: dict[str, Any] = {"estimate": True}
        out.update((f.name, getattr(self, f.name)) for f in fields(self))
        out["per_layer"] = [layer.as_dict() for layer in self.per_layer]
        if self.model is None:
            del out["model"]
        return out


def estimate_kv_bytes(
    config: Any,
    context_tokens: int,
    method: str | Method,
    budget: Budget | float | str,
    dtype: torch.dtype | str,
    chunk_size: int | None = None,
    method_options: dict | None = None,
) -> Estimate:
    """KV-cache bytes after prefilling ``context_tokens`` with ``method`` at ``budget``.

    ``config``: a transformers config, a ``config.json`` dict or anything with its fields.
    Under an allocation that ranks entries across layers (``global``, ``heads``, ``relative``)
    the totals are exact, but how the layers share them depends on the run's scores: the
    per-layer figures are then the even split.
    """
    if not isinstance(budget, Budget):
        budget = parse_budget(budget)
    chunk_size = defaults.CHUNK_SIZE if chunk_size is None else int(chunk_size)
    check_chunk_size(chunk_size)
    if int(context_tokens) < 1:
        raise KvcliError(f"invalid context length {context_tokens}: it must be a positive number of tokens")
    context_tokens = int(context_tokens)
    meth = make_estimating_method(method, method_options)
    if not meth.uses_budget:  # as the Engine: a structural saving only (plain PoD), no token budget
        budget = FULL
    shape = cache_shape(config, dtype)
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
        peak = max(peak, sum(layer.bytes for layer in _layers(shape, meth, before)))
        target = budget.target(seen)
        if meth.compresses and length > target:
            length, was_compressed = target, True
        after = replace(before, compressed=True, length=length, was_compressed=was_compressed)
        layers = _layers(shape, meth, after)
        trace.append({"tokens": seen, "kv_bytes": sum(layer.bytes for layer in layers)})

    total = sum(layer.bytes for layer in layers)
    full = full_bytes(shape, seen)
    growing = shape.growing_indices
    return Estimate(
        method=meth.label,
        method_options=meth.options(),
        budget=str(budget),
        dtype=str(shape.dtype).removeprefix("torch."),
        context_tokens=context_tokens,
        chunk_size=chunk_size,
        kv_bytes=total,
        kv_bytes_full=full,
        kv_ratio=total / full if full else 1.0,
        compressed_layers=growing,
        kv_bytes_per_layer=[layers[i].bytes for i in growing],
        kv_bytes_all_layers=[layer.bytes for layer in layers],
        kept_tokens=[layers[i].entries for i in growing],
        per_layer=layers,
        peak_prefill_kv_bytes=peak,
        trace=trace,
    )


# ---- a whole estimate (``kvcli profile --estimate``) -----------------------------------------------
@dataclass
class EstimateSpec:
    """What to estimate: every method at one budget, for ``tokens`` of context, from ``model``'s
    configuration (``embedded``, a ``config.json``, a model directory, or a cached hub id).
    ``dtype`` ``auto``: the one the configuration declares, else ``device``'s default."""

    methods: list[str]
    budget: str = defaults.PROFILE_BUDGET
    chunk_size: int = defaults.CHUNK_SIZE
    options: dict[str, dict] = field(default_factory=dict)  # per method
    model: str = defaults.MODEL
    dtype: str = "auto"
    tokens: int = defaults.PROFILE_TOKENS
    device: str = "auto"


@dataclass
class EstimateResult:
    rows: list[Estimate]
    shape: CacheShape
    path: Path  # the configuration read
    dtype: str = "float32"
    dtype_source: str = "requested"  # "requested" | "config" | "device"


DTYPES = ("float32", "bfloat16", "float16")


def config_dtype(config: Any) -> str | None:
    """The dtype a configuration declares (``dtype``, or the older ``torch_dtype``), when it
    is one kvcli runs; ``None`` otherwise."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        name = str(value).removeprefix("torch.") if value is not None else None
        if name in DTYPES:
            return name
    return None


def resolve_estimate_dtype(requested: str, config: Any, device: str = "auto") -> tuple[str, str]:
    """``(dtype, source)`` of an estimate: ``requested`` unless it is ``auto``; then what the
    configuration declares (a float16 checkpoint is priced at float16); else what kvcli loads
    on ``device`` (float32 on the CPU, bfloat16 on CUDA)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise KvcliError(f"dtype {requested!r} is invalid: use auto, {', '.join(DTYPES)}", option="dtype")
        return requested, "requested"
    declared = config_dtype(config)
    if declared is not None:
        return declared, "config"
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return ("bfloat16" if cuda else "float32"), "device"


def config_path(model: str) -> Path:
    """Where ``model``'s configuration is (nothing is converted or downloaded; an embedded model
    not converted yet is described by its bundled ``config.json``)."""
    return config_location(model)


def document_tokens(path: Path, document: str) -> int:
    """Tokens of ``document`` (with BOS) under the tokenizer saved next to the configuration ``path``."""
    tok_dir = path if path.is_dir() else path.parent
    try:
        tok = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=False)
    except Exception:
        raise KvcliError(
            f"no tokenizer next to {path} to count the document's tokens; give a token count instead", option="document"
        ) from None
    return len(tok.encode(load_document(document).text, add_special_tokens=False)) + 1


def estimate_all(spec: EstimateSpec) -> EstimateResult:
    """Every method of ``spec`` (the full cache at budget 1), from the configuration alone."""
    path = config_path(spec.model)
    config = load_config(path)
    dtype, source = resolve_estimate_dtype(spec.dtype, config, spec.device)
    rows = [
        estimate_kv_bytes(
            config,
            spec.tokens,
            m,
            "1" if m == "full" else spec.budget,
            dtype,
            spec.chunk_size,
            spec.options.get(m),
        )
        for m in spec.methods
    ]
    for r in rows:
        r.model = str(path)
    return EstimateResult(rows=rows, shape=cache_shape(config, dtype), path=path, dtype=dtype, dtype_source=source)
