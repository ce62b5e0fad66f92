"""Saving a context, and checking a saved one against a model: what a ``.kvc`` header says.

The container and its checksum are ``kvcli.core.kvcfile``; the cache's tensors are
``kvcli.cache.serialize``.  This module writes the header (format version, kvcli version,
the model's fingerprint, dtype, method and options, budget, scoring, template, tokens,
sources, and for a ``relative`` budget what each layer has evicted so far) and reads it back
into the objects a context is rebuilt from: the method (PoD with the blocks it chose), the
budget, the template, the prefill's measured figures, the allocation's history.  Loading
itself (``load_context``) is ``kvcli.api.reloading``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import __version__
from ..cache.serialize import cache_state
from ..core import kvcfile
from ..core.budget import Budget, parse_budget
from ..core.errors import KvcliError
from ..core.fileio import atomic_write_bytes
from ..core.prompts import Template
from ..engine.engine import PrefillStats
from ..engine.models import LoadedModel
from ..engine.models.fingerprint import fingerprint
from ..engine.scoring import SCORINGS
from ..methods import Method, make_method
from ..methods.allocation import Ranked

if TYPE_CHECKING:
    from .context import Context

LOGITS = "engine.last_logits"  # where decoding starts: the logits after the last context token
RANKED = "ranked"  # ``relative``'s history: tensors ``ranked.{layer}.sums``, header ``ranked`` {layer: count}
PREFILL_FIELDS = (
    "tokens",
    "seconds",
    "compress_seconds",
    "scoring_seconds",
    "chunks",
    "max_cache_bytes",
    "max_scoring_cache_bytes",
)


@dataclass
class SavedContext:
    """What ``Context.save`` wrote."""

    path: Path
    file_bytes: int
    kv_bytes: int
    header: dict[str, Any]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ranked_state(ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """What ``relative`` has evicted so far, per layer: the sums of the evicted scores as
    tensors and their counts for the header (both empty when nothing was ranked)."""
    ranked = ctx.engine.method.ranked_history(ctx.engine.cache)
    if ranked is None:
        return {}, {}
    tensors = {
        f"{RANKED}.{key}.sums": sums.detach().to("cpu", torch.float32).contiguous() for key, sums in ranked.sums.items()
    }
    return tensors, {str(key): int(n) for key, n in ranked.counts.items()}


def build_header(ctx: Context, layers: list[dict[str, Any]], ranked: dict[str, int] | None = None) -> dict[str, Any]:
    """kvcli's header for ``ctx`` (without the checksum, which covers the tensors too)."""
    engine, lm = ctx.engine, ctx.lm
    rep = engine.cache.report(lm.dtype)
    stats = engine.stats
    extra = {RANKED: ranked} if ranked else {}
    return {
        "format": kvcfile.FORMAT,
        "format_version": kvcfile.FORMAT_VERSION,
        "kvcli_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "model": {"name": lm.name, "ref": lm.ref or lm.name, **fingerprint(lm.model, lm.tokenizer)},
        "dtype": dtype_name(lm.dtype),
        "method": engine.method.label,
        "method_options": engine.method.options(),
        "budget": str(engine.budget),
        "scoring": engine.scoring.name,
        "scored": bool(engine.track),
        "chunk_size": engine.chunk_size,
        "template": asdict(ctx.template),
        "context_tokens": ctx.context_tokens,
        "truncated_tokens": ctx.truncated,
        "sources": list(ctx.sources),
        "layers": layers,
        "prefill": {name: getattr(stats, name) for name in PREFILL_FIELDS},
        "kv_bytes": rep.kv_bytes,
        "kv_bytes_full": rep.kv_bytes_full,
        **extra,
    }


def save_context(ctx: Context, path: str | os.PathLike, force: bool = False) -> SavedContext:
    """Write ``ctx`` to ``path`` atomically; an existing file is replaced only with ``force``."""
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not force:
        raise KvcliError(f"{path}: exists; kvcli does not replace it (use --force)", option="force")
    if not path.parent.is_dir():
        raise KvcliError(f"{path}: its directory does not exist", option="output")
    if not ctx.sources:
        ctx.sources = [{"name": "unknown", "sha256": "", "tokens": ctx.context_tokens}]
    tensors, layers = cache_state(ctx.engine.cache)
    tensors[LOGITS] = ctx.engine.context_logits().detach().to("cpu").contiguous()
    ranked_tensors, ranked = ranked_state(ctx)
    tensors.update(ranked_tensors)
    header = build_header(ctx, layers, ranked)
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a method option that JSON cannot hold: a bug, said plainly
        raise RuntimeError(f"the context's header cannot be written as JSON: {exc}") from None
    header = kvcfile.sign(save(tensors, metadata={kvcfile.METADATA_KEY: text}), header)
    blob = save(tensors, metadata={kvcfile.METADATA_KEY: json.dumps(header, allow_nan=False)})
    try:
        atomic_write_bytes(path, blob, replace=force)
    except OSError as exc:
        raise KvcliError(f"{path}: cannot write it ({exc.strerror or type(exc).__name__})", option="output") from None
    return SavedContext(path=path, file_bytes=len(blob), kv_bytes=header["kv_bytes"], header=header)


# ---- reading a header back --------------------------------------------------------------------------
def _bad(name: str, why: str) -> KvcliError:
    return KvcliError(f"{name}: not a usable kvcli context file ({why})")


def check_model(saved: kvcfile.SavedFile, lm: LoadedModel) -> None:
    """The context was computed by this model, at this dtype (else a one-line error saying
    which model it needs)."""
    header, name = saved.header, saved.name
    model = header["model"]
    if header["dtype"] != dtype_name(lm.dtype):
        raise KvcliError(
            f"{name}: saved in {header['dtype']}, the model is loaded in {dtype_name(lm.dtype)} "
            f"(use --dtype {header['dtype']})",
            option="dtype",
        )
    mine = fingerprint(lm.model, lm.tokenizer)
    differ = [k.removesuffix("_sha256") for k in mine if model.get(k) != mine[k]]
    if differ:
        raise KvcliError(
            f"{name}: saved from another model ({model['name']}, --model {model['ref']}); "
            f"this one's {' and '.join(differ)} differ",
            option="model",
        )


#: Options whose default changed since files were written: a file that does not name one
#: was written when it had this value (snapkv's ``pool`` was always "avg" before it became
#: an option with "max" as default, 2026-12-06; its max pool was centred before ``ahead``,
#: 2026-12-07).
WRITTEN_BEFORE = {"snapkv": {"pool": "avg", "ahead": 0}}


def method_from(saved: kvcfile.SavedFile) -> Method:
    """The method the context was compressed with, its options as saved (PoD: the blocks it
    chose, so a calibration profile written since cannot change the layout)."""
    label, opts = saved.header["method"], dict(saved.header["method_options"])
    parts = label.split("+")
    opts.pop("blocks_source", None)
    inner = opts.pop("inner", None)
    opts = {**WRITTEN_BEFORE.get(parts[0], {}), **opts}
    if len(parts) == 2:
        if not isinstance(inner, dict):
            raise _bad(saved.name, f"method {label} has no options for {parts[1]}")
        inner = {**WRITTEN_BEFORE.get(parts[1], {}), **inner}
        options = {
            **{f"{parts[0]}.{k}": v for k, v in opts.items()},
            **{f"{parts[1]}.{k}": v for k, v in inner.items()},
        }
    else:
        options = opts
    try:
        method = make_method(label, **options)
    except KvcliError as exc:
        raise _bad(saved.name, f"method: {exc}") from None
    except (TypeError, ValueError):
        raise _bad(saved.name, f"method {label}: options that do not fit it") from None
    return method


def restore_method_state(method: Method, saved: kvcfile.SavedFile) -> None:
    """What a method reports about its run that its options do not carry (PoD's blocks' source)."""
    source = saved.header["method_options"].get("blocks_source")
    if hasattr(method, "blocks_source") and isinstance(source, str):
        method.blocks_source = source


def ranked_from(saved: kvcfile.SavedFile, tensors: dict[str, torch.Tensor], device: torch.device) -> Ranked | None:
    """``relative``'s history as saved, its tensors taken out of ``tensors`` (None for a file
    without one: written before it was kept, or nothing evicted yet; it starts from what it holds)."""
    counts = saved.header.get(RANKED)
    names = {name for name in tensors if name.startswith(RANKED + ".")}
    if counts is None and not names:
        return None
    counts = {} if counts is None else counts
    if not isinstance(counts, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(n, int) and not isinstance(n, bool) and n >= 0
        for k, n in counts.items()
    ):
        raise _bad(saved.name, f"header field {RANKED!r} must map layers to counts")
    if names != {f"{RANKED}.{key}.sums" for key in counts}:
        raise _bad(saved.name, "the allocation's history does not match its tensors")
    ranked = Ranked()
    for key, n in counts.items():
        sums = tensors.pop(f"{RANKED}.{key}.sums")
        if sums.dim() != 3 or sums.shape[-1] != 1 or not sums.is_floating_point():
            raise _bad(saved.name, f"the allocation's history of layer {key} has the wrong shape")
        ranked.sums[int(key)] = sums.to(device)
        ranked.counts[int(key)] = n
    return ranked


def check_ranked(saved: kvcfile.SavedFile, ranked: Ranked, layers: list[Any]) -> None:
    """Every layer in the history is a growing layer of the restored cache, with its heads."""
    heads = {layer.layer_idx: tuple(layer.require("values").shape[:2]) for layer in layers}
    for key, sums in ranked.sums.items():
        if heads.get(key) != tuple(sums.shape[:2]):
            raise _bad(saved.name, f"the allocation's history names layer {key}, which does not fit the cache")


def budget_from(saved: kvcfile.SavedFile) -> Budget:
    try:
        # A budget without ":ALLOCATION" was written before the default became "heads",
        # when a bare ratio meant "uniform".
        return parse_budget(saved.header["budget"], "uniform")
    except KvcliError as exc:
        raise _bad(saved.name, f"budget: {exc}") from None


def scoring_from(saved: kvcfile.SavedFile) -> str:
    scoring = saved.header["scoring"]
    if scoring not in SCORINGS:
        raise _bad(saved.name, f"scoring {scoring!r} is unknown")
    return scoring


def template_from(saved: kvcfile.SavedFile) -> Template:
    """The prompt template the context was prefilled with (answers must use the same one)."""
    data = saved.header["template"]
    kinds = {f.name: f.type for f in fields(Template)}
    if set(data) != set(kinds):
        raise _bad(saved.name, "template fields differ from this kvcli's")
    ok = all(isinstance(data[k], str) for k in ("prefix", "question_format", "summary_suffix"))
    ok = ok and isinstance(data["add_bos"], bool)
    ok = ok and all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in (data["stop_answer"], data["stop_summary"])
    )
    if not ok or "{question}" not in data["question_format"]:
        raise _bad(saved.name, "template fields have the wrong types")
    try:
        data["question_format"].format(question="q")
    except (KeyError, IndexError, ValueError, AttributeError):
        raise _bad(saved.name, "template question_format is not a usable format") from None
    return Template(**data)


def stats_from(saved: kvcfile.SavedFile) -> PrefillStats:
    data = saved.header["prefill"]
    stats = PrefillStats()
    for name in PREFILL_FIELDS:
        value = data.get(name)
        want = type(getattr(stats, name))
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (want is int and not isinstance(value, int))
        ):
            raise _bad(saved.name, f"prefill field {name!r} is missing or not a number")
        setattr(stats, name, want(value))
    return stats


def check_counts(saved: kvcfile.SavedFile, max_positions: int) -> None:
    header, name = saved.header, saved.name
    tokens = header["context_tokens"]
    if tokens < 1 or sum(s["tokens"] for s in header["sources"]) != tokens:
        raise _bad(name, "its token counts do not add up")
    if max_positions and tokens > max_positions:
        raise _bad(name, f"{tokens} tokens, more than the model's {max_positions} positions")
    if header["chunk_size"] < 1:
        raise _bad(name, "chunk_size must be positive")
