"""How fast this machine runs the model, measured in a few seconds: the rates a long run's
plan is priced at (``kvcli eval`` and ``kvcli profile`` print "~N min" from them)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..api import LoadedModel, prefill
from ..core import defaults
from ..engine.sampler import Sampler


@dataclass
class Speed:
    """Seconds per prefilled token (one chunk, full cache), per decoded token (greedy), and
    per prefilled token of a method that scores entries (its scoring passes included), when
    measured."""

    prefill: float
    decode: float
    scored: float | None = None


def measure_speed(
    lm: LoadedModel,
    text: Any,
    chunk_size: int = defaults.CHUNK_SIZE,
    decode_tokens: int = 4,
    raw: bool = False,
    scored: str | None = None,
    scoring: str = defaults.SCORING,
) -> Speed:
    """Prefill one chunk of ``text`` (token ids with ``raw``) with the full cache, then decode
    ``decode_tokens`` greedily, each timed; with ``scored`` (a method that scores entries),
    also one chunk with it at budget 0.5 and ``scoring`` (its scoring passes can cost more
    than the forward itself).  A 4-token forward and one decode step go first,
    so one-time costs (memory-mapped weights read in, kernels and thread pools set up) are
    not in the rates.  The first chunk is the cheapest one of a long document (its attention
    is the shortest), so a plan priced at this rate is a little optimistic; runs correct
    their estimate with what they measure."""
    ids = torch.as_tensor(text if raw else lm.tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    ids = ids[:chunk_size]
    if ids.numel() < 8:
        ids = torch.arange(3, 3 + chunk_size)
    warm = prefill(lm, ids[:4], method="full", chunk_size=4, raw=True)
    list(warm.engine.generate(warm.engine.context_logits(), 2, Sampler(), eos_ids=set()))
    t0 = time.perf_counter()
    ctx = prefill(lm, ids, method="full", chunk_size=chunk_size, raw=True)
    t1 = time.perf_counter()
    n = sum(1 for _ in ctx.engine.generate(ctx.engine.context_logits(), decode_tokens + 1, Sampler(), eos_ids=set()))
    t2 = time.perf_counter()
    rate = None
    if scored is not None:
        t3 = time.perf_counter()
        prefill(lm, ids, method=scored, budget=0.5, chunk_size=chunk_size, scoring=scoring, raw=True)
        rate = (time.perf_counter() - t3) / ids.numel()
    # generate yields the first token from the prefill's logits: n tokens cost n - 1 forwards
    return Speed(prefill=(t1 - t0) / ids.numel(), decode=(t2 - t1) / max(1, n - 1), scored=rate)
