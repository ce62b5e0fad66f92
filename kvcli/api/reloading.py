"""A saved context (``.kvc``) back in memory, and a context continued with more text.

``load_context`` rebuilds what a prefill leaves behind: the engine with the same method
(options and state, ``relative``'s history included), budget, scoring and chunk size, the
cache's tensors, and the logits decoding starts from, so answers are token-identical to
those the context gave before it was saved.  ``append_document`` prefills more text after a
context, at the next logical positions and under the same budget (``kvcli compress more.txt
--append doc.kvc``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..cache.serialize import restore_cache
from ..core import defaults, kvcfile
from ..core.documents import Document
from ..core.errors import KvcliError
from ..engine.engine import Engine
from ..engine.models import LoadedModel
from . import saved as header
from .context import Context
from .prefilling import DocumentTooLong, make_scoring, source_entry


def load_context(lm: LoadedModel, path: str | os.PathLike, backend: str = "auto") -> Context:
    """Read a ``.kvc`` file written by ``Context.save`` for model ``lm``.  A file from another
    model or dtype, another format version, truncated, corrupted or forged is a one-line
    ``KvcliError`` (nothing is loaded)."""
    saved, data = kvcfile.read(path)
    return context_from(lm, saved, data, backend)


def context_from(lm: LoadedModel, saved: kvcfile.SavedFile, data: bytes, backend: str = "auto") -> Context:
    """``load_context`` on a file already read and checked (``kvcfile.read``)."""
    from safetensors.torch import load

    header.check_model(saved, lm)
    header.check_counts(saved, lm.max_positions)
    template = header.template_from(saved)
    method = header.method_from(saved)
    budget = header.budget_from(saved)
    name = header.scoring_from(saved)
    stats = header.stats_from(saved)
    h = saved.header
    # A question scoring needs its questions only while prefilling: the reloaded context
    # reports the name it was scored with (``--append`` refuses to score without them).
    plan = make_scoring("window" if "question" in name else name, template, lm.tokenizer, [])
    plan.name = name
    engine = Engine(lm.model, method, budget, chunk_size=h["chunk_size"], backend=backend, scoring=plan)
    header.restore_method_state(method, saved)
    try:
        tensors = load(data)
    except Exception as exc:  # the safetensors reader's own errors (checked above, so a rare case)
        raise KvcliError(f"{saved.name}: not a usable kvcli context file ({type(exc).__name__})") from None
    ranked = header.ranked_from(saved, tensors, lm.device)
    logits = tensors.pop(header.LOGITS, None)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    if logits is None or logits.dim() != 1 or logits.shape[0] != vocab or not logits.is_floating_point():
        raise KvcliError(f"{saved.name}: does not fit this model (no logits over its {vocab}-token vocabulary)")
    restore_cache(engine.cache, tensors, h["layers"], h["context_tokens"], lm.dtype, lm.device, saved.name)
    if ranked is not None:
        header.check_ranked(saved, ranked, engine.cache.growing_layers)
        method.resume_ranked(engine.cache, ranked)
    engine.resume(logits.to(lm.device), stats)
    return Context(
        lm=lm,
        engine=engine,
        template=template,
        context_tokens=h["context_tokens"],
        truncated=h["truncated_tokens"],
        sources=[dict(s) for s in h["sources"]],
    )


def append_document(
    ctx: Context,
    document: Document | str,
    truncate: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Prefill ``document`` after ``ctx``'s context (no template prefix: it continues the
    text), compressing under the context's budget; returns the tokens added."""
    engine = ctx.engine
    if "question" in engine.scoring.name:
        raise KvcliError(
            f"this context was scored with its questions ({engine.scoring.name}); it cannot score more text "
            "without them",
            option="scoring",
        )
    text = document.text if isinstance(document, Document) else str(document)
    tok = ctx.tokenizer
    ids = torch.tensor([tok.encode("\n\n" + text, add_special_tokens=False)], dtype=torch.long)
    limit = ctx.lm.max_positions
    room = limit - defaults.QUESTION_RESERVE - ctx.context_tokens if limit else ids.shape[1]
    truncated = 0
    if ids.shape[1] > room:
        if not truncate or room <= 0:
            raise DocumentTooLong(ctx.context_tokens + ids.shape[1], limit, max(room, 0) + ctx.context_tokens)
        truncated = ids.shape[1] - room
        ids = ids[:, :room]
    if ids.shape[1] == 0:
        raise KvcliError("the text to append is empty after tokenization")
    logits = engine.prefill(ids, on_chunk=on_progress)
    if not bool(torch.isfinite(logits).all()):
        raise KvcliError("the model's outputs overflowed (inf/NaN) at this dtype; use float32 or bfloat16")
    ctx.context_tokens += ids.shape[1]
    ctx.truncated += truncated
    ctx.sources.append(source_entry(document, ids.shape[1]))
    return int(ids.shape[1])
