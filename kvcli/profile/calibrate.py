"""PoD layer grouping by calibration (``kvcli calibrate``; the CLI is in ``kvcli.cli.calibrate``).

PoD (Ma et al., 2412.02252) shares the keys of *distant* tokens inside blocks of
consecutive full-attention ("growing") layers.  The paper groups layers whose attention
over distant tokens is similar, measured by the Jensen-Shannon divergence (JSD) on
calibration text.  What this module does, and the choices the paper leaves open:

* **Text.**  Any token ids; the CLI uses a document or generated filler prose
  (``kvcli.eval.fillers``, 4096 tokens by default) behind the same prefix a real run gets
  (BOS / chat prefix).
* **Forward.**  kvcli's own engine with the full cache, chunked (``chunk_size``): the
  first ``T - queries`` tokens are prefilled, then the last ``queries`` tokens are
  forwarded as one chunk while an observer on kvcli's attention function keeps their
  post-RoPE queries (``RunState.observer``).  Keys are read from the cache afterwards.
  No eager attention, no ``output_attentions``: beyond the full cache, memory is the
  kept queries plus ``(query heads per KV head) x queries x T`` floats for one KV head
  of one pair of layers at a time (linear in ``T``).
* **Distant keys.**  As in PoD, per query the proximal tokens are the first ``sinks``
  (``n_s`` = 16) and the recent window (``recent``; default PoD's own rule for ``T``
  tokens, ``max(256, 12.5% of T)``).  Calibration uses one distant set for every
  observed query: positions ``sinks <= p < T - recent``; the observed queries are the
  last ``queries`` (default 128 <= ``recent``) positions, so every one of them sees the
  whole set and nothing of it is proximal for any of them.
* **Distributions.**  For each query head and observed query, the softmax of
  ``q . k * scaling`` over the distant keys only (renormalised over that set: PoD
  changes only which keys score distant tokens, and the question is whether two layers
  look at the same distant tokens).  Grouped-query attention: query head ``h`` uses KV
  head ``h // (Hq / Hkv)`` as the model does.  ``heads="group"`` (default): the
  distributions of the query heads of one KV group are averaged into one distribution
  per KV head (what that KV head's keys receive), and KV head ``h`` of one layer is
  compared with KV head ``h`` of the other: PoD shares keys per KV head, and the order
  of query heads inside a group means nothing across layers (with MQA, as in Gemma 3,
  every query head reads the one shared KV head).  ``heads="each"``: query head ``h``
  is compared with query head ``h`` (stricter; depends on that arbitrary order).
* **JSD.**  Natural log (bounded by ln 2 ~ 0.693), per (head, query), then averaged over
  heads and queries: one number per pair of layers.
  ``measure="attention"`` (default, the paper's): JSD between layer a's and layer b's
  own distant attention.  ``measure="shared"``: JSD between layer b's attention with its
  own distant keys and with layer a's keys (``softmax(q_b . k_a)``), which is the
  distortion PoD itself introduces when b reads anchor a's keys (asymmetric: a < b).
* **Grouping** (``choose_blocks``).  Threshold rule (default): walk the growing layers;
  the next layer joins the current block while its JSD to the block's *first* layer
  (the anchor, whose keys it would read) is at most ``threshold`` and the block has
  fewer than ``max_block`` layers (0 = no limit).  The paper reports a similarity
  threshold of 0.5; read as ``1 - JSD / ln 2 >= 0.5``, the default threshold is
  ``ln 2 / 2 ~ 0.347`` nats (an interpretation).  Count rule (``n_blocks=N``): cut at the
  ``N - 1`` largest divergences between consecutive growing layers (``max_block`` and
  ``threshold`` do not apply).
* Also reported per growing layer: the mean share of the observed queries' attention
  that goes to the distant keys (``distant_mass``): where it is small, sharing those
  keys matters little whatever the JSD.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from ..attention import ATTN_NAME
from ..core import defaults
from ..core.budget import FULL
from ..core.errors import KvcliError
from ..core.fileio import atomic_write_text
from ..core.prompts import choose_template
from ..engine.engine import Engine
from ..eval.fillers import filler_sentences
from ..methods import make_method
from ..methods.pod import PoD

LN2 = defaults.LN2
DEFAULT_TOKENS = defaults.CALIBRATE_TOKENS
DEFAULT_QUERIES = defaults.CALIBRATE_QUERIES
DEFAULT_SINKS = defaults.POD_N_SINK
DEFAULT_MAX_BLOCK = defaults.CALIBRATE_MAX_BLOCK
DEFAULT_THRESHOLD = defaults.CALIBRATE_THRESHOLD
MIN_DISTANT = 16  # fewer distant keys than this make a meaningless distribution
MEASURES = defaults.CALIBRATE_MEASURES
HEAD_MODES = defaults.CALIBRATE_HEAD_MODES


# ---- the divergence -----------------------------------------------------------------------------
def jsd(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions along ``dim``; in [0, ln 2]."""
    p, q = p.float(), q.float()
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(dim)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(dim)
    return (0.5 * (kl_pm + kl_qm)).clamp(0.0, LN2)


def _attention(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax of ``query [Hq, W, D]`` over ``keys [Hkv, N, D]`` (query head h reads KV head
    h // (Hq / Hkv)): ``[Hq, W, N]`` float32."""
    hq, w, d = query.shape
    hkv = keys.shape[0]
    q = query.float().reshape(hkv, (hq // hkv) * w, d)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling
    return torch.softmax(logits, dim=-1).reshape(hq, w, -1)


# ---- text ----------------------------------------------------------------------------------------
def document_ids(lm, text: str) -> list[int]:
    """``text`` as a run would see it: the template's prefix (BOS / chat prefix), then the text."""
    tok = lm.tokenizer
    return choose_template(tok, lm.is_base).prefix_ids(tok) + list(tok.encode(text, add_special_tokens=False))


def filler_ids(lm, tokens: int, seed: int = 0, style: str = "prose") -> list[int]:
    """``tokens`` ids of generated filler text (``kvcli.eval.fillers``), prefix included."""
    sentences = filler_sentences(style, random.Random(seed))
    parts: list[str] = []
    chars = 0
    want = max(64, 6 * tokens)  # a generous first guess of characters per token
    while True:
        while chars < want:
            parts.append(next(sentences))
            chars += len(parts[-1]) + 1
        ids = document_ids(lm, " ".join(parts))
        if len(ids) >= tokens:
            return ids[:tokens]
        want *= 2


# ---- result --------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Divergences between growing layers, and the blocks chosen from them.

    ``matrix[i][j]`` (positions in ``growing``, ``i < j``) is the mean JSD for anchor
    ``growing[i]`` and member ``growing[j]``; ``None`` where it was not computed (farther
    apart than ``max_block`` allows).  For ``measure="attention"`` it is symmetric and
    filled both ways."""

    growing: list[int]
    matrix: list[list[float | None]]
    distant_mass: list[float]
    tokens: int
    queries: int
    recent: int
    sinks: int
    distant_keys: int
    measure: str
    heads: str = "group"
    seconds: float = 0.0
    blocks: list[list[int]] = field(default_factory=list)
    rule: dict = field(default_factory=dict)

    @property
    def consecutive(self) -> list[float]:
        """JSD between each growing layer and the next one (always measured)."""
        return [_value(self.matrix[i][i + 1]) for i in range(len(self.growing) - 1)]

    def profile(self, model: str) -> dict:
        """The JSON written for ``PoD.choose_blocks`` (it reads ``blocks``)."""
        g = self.growing
        pairs = [
            [g[i], g[j], round(v, 6)]
            for i in range(len(g))
            for j in range(i + 1, len(g))
            if (v := self.matrix[i][j]) is not None
        ]
        return {
            "blocks": self.blocks,
            "method": "jsd",
            "model": model,
            "tokens": self.tokens,
            "growing_layers": g,
            "jsd": [round(v, 6) for v in self.consecutive],
            "jsd_pairs": pairs,
            "distant_mass": [round(v, 6) for v in self.distant_mass],
            "measure": self.measure,
            "heads": self.heads,
            **self.rule,
            "queries": self.queries,
            "recent": self.recent,
            "sinks": self.sinks,
            "distant_keys": self.distant_keys,
            "seconds": round(self.seconds, 3),
        }


# ---- grouping -------------------------------------------------------------------------------------
def choose_blocks(
    growing: list[int],
    matrix: list[list[float | None]],
    threshold: float = DEFAULT_THRESHOLD,
    max_block: int = DEFAULT_MAX_BLOCK,
    n_blocks: int | None = None,
) -> list[list[int]]:
    """Blocks of consecutive growing layers (model layer indices); see the module docstring."""
    n = len(growing)
    if n == 0:
        return []
    check_rule(threshold, max_block, n_blocks)
    if n_blocks is not None:
        if n_blocks > n:
            raise KvcliError(
                f"n_blocks {n_blocks} is too many: give 1 to {n} (the model has {n} full-attention layers)",
                option="n_blocks",
            )
        gaps = sorted(range(n - 1), key=lambda k: (-_value(matrix[k][k + 1]), k))[: n_blocks - 1]
        cuts = sorted(k + 1 for k in gaps)
        bounds = [0, *cuts, n]
        return [growing[a:b] for a, b in pairwise(bounds)]
    blocks: list[list[int]] = []
    current = [0]
    for j in range(1, n):
        d = matrix[current[0]][j]
        if (max_block == 0 or len(current) < max_block) and d is not None and d <= threshold:
            current.append(j)
        else:
            blocks.append(current)
            current = [j]
    blocks.append(current)
    return [[growing[i] for i in b] for b in blocks]


def check_rule(threshold: float, max_block: int, n_blocks: int | None) -> None:
    """The grouping rule's settings, or a one-line error (the count rule ignores the others)."""
    if n_blocks is not None:
        if n_blocks < 1:
            raise KvcliError(f"n_blocks {n_blocks} is invalid: it must be at least 1", option="n_blocks")
    elif not threshold >= 0 or max_block < 0:
        raise KvcliError(f"invalid grouping: threshold {threshold} and max_block {max_block} must be >= 0")


def _value(v: float | None) -> float:
    return math.inf if v is None else v


# ---- measuring ------------------------------------------------------------------------------------
def default_recent(tokens: int) -> int:
    """PoD's recent window after ``tokens`` tokens with its default options."""
    return PoD().recent_window(tokens)


def measure(
    model,
    ids,
    *,
    queries: int = DEFAULT_QUERIES,
    recent: int | None = None,
    sinks: int = DEFAULT_SINKS,
    how: str = "attention",
    heads: str = "group",
    band: int | None = None,
    chunk_size: int = defaults.CHUNK_SIZE,
    backend: str = "auto",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Calibration:
    """Run ``ids`` through ``model`` (a ``LoadedModel`` or a model with kvcli's attention
    installed) and measure the JSD between growing layers no more than ``band`` apart
    (``None``: every pair).  ``on_progress(stage, done, total)``: ``prefill`` in tokens,
    then ``measure`` in pairs of layers.  Blocks are not chosen here (``calibrate`` does)."""
    model = getattr(model, "model", model)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise KvcliError("calibrate: the model must run kvcli's attention (api.load_model or api.wrap_model)")
    if how not in MEASURES:
        raise KvcliError(f"unknown measure {how!r} (choose from {', '.join(MEASURES)})")
    if heads not in HEAD_MODES:
        raise KvcliError(f"unknown head mode {heads!r} (choose from {', '.join(HEAD_MODES)})")
    ids = torch.as_tensor(ids, dtype=torch.long).view(1, -1)
    total = ids.shape[1]
    recent = default_recent(total) if recent is None else int(recent)
    if queries < 1 or sinks < 0 or recent < 1 or chunk_size < 1:
        raise KvcliError("calibrate: queries >= 1, sinks >= 0, recent >= 1 and chunk_size >= 1 are required")
    if queries > recent:
        raise KvcliError(
            f"calibrate: {queries} queries exceed the recent window of {recent} tokens "
            "(the observed queries must lie inside it)"
        )
    n_distant = total - recent - sinks
    if n_distant < MIN_DISTANT:
        need = sinks + recent + MIN_DISTANT
        raise KvcliError(
            f"calibration text is {total} tokens; with {sinks} sinks and a recent window of {recent} "
            f"it needs at least {need} (>= {MIN_DISTANT} distant tokens)"
        )

    t0 = time.perf_counter()
    engine = Engine(model, make_method("full"), FULL, chunk_size=chunk_size, backend=backend)
    growing = engine.cache.growing_indices
    if not growing:
        raise KvcliError("calibrate: the model has no full-attention layers (nothing for PoD to group)")
    report = None if on_progress is None else (lambda done, n: on_progress("prefill", done, total))
    head = ids[:, : total - queries]
    if head.shape[1]:
        engine.prefill(head, on_chunk=report)
    captured: dict[int, tuple[torch.Tensor, float]] = {}
    wanted = set(growing)

    def observe(layer_idx: int, query: torch.Tensor, q_pos: torch.Tensor, scaling: float) -> None:
        if layer_idx in wanted:
            captured[layer_idx] = (query[0, :, -queries:].detach().float().clone(), float(scaling))

    engine.state.observer = observe
    try:
        engine.forward(ids[:, total - queries :])
    finally:
        engine.state.observer = None
    if on_progress is not None:
        on_progress("prefill", total, total)
    missing = [i for i in growing if i not in captured]
    if missing:
        raise KvcliError(f"calibrate: no queries were observed for layers {missing} (is kvcli's attention installed?)")

    horizon = total - recent
    n = len(growing)
    band = n - 1 if band is None else max(1, min(int(band), n - 1))
    matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
    with torch.inference_mode():
        keys = []
        for idx, layer in zip(growing, engine.cache.growing_layers, strict=True):
            if layer.length != total or layer.positions is not None:
                raise KvcliError(f"calibrate: layer {idx} does not hold the {total} tokens in order")
            keys.append(layer.keys[0, :, :total])  # [Hkv, T, D], a view of the cache
        mass = [_distant_mass(*captured[growing[j]], keys[j], sinks, horizon) for j in range(n)]
        pairs = [(i, j) for j in range(n) for i in range(max(0, j - band), j)]
        for done, (i, j) in enumerate(pairs, 1):
            v = _pair_jsd(
                captured[growing[i]], keys[i], captured[growing[j]], keys[j], slice(sinks, horizon), how, heads
            )
            matrix[i][j] = v
            if how == "attention":
                matrix[j][i] = v
            if on_progress is not None:
                on_progress("measure", done, len(pairs))
    return Calibration(
        growing=growing,
        matrix=matrix,
        distant_mass=mass,
        tokens=total,
        queries=queries,
        recent=recent,
        sinks=sinks,
        distant_keys=n_distant,
        measure=how,
        heads=heads,
        seconds=time.perf_counter() - t0,
    )


def _pair_jsd(
    anchor: tuple[torch.Tensor, float],
    k_anchor: torch.Tensor,
    member: tuple[torch.Tensor, float],
    k_member: torch.Tensor,
    distant: slice,
    how: str,
    heads: str = "group",
) -> float:
    """Mean JSD over heads (KV heads for ``heads="group"``, query heads for ``"each"``) and
    queries for one pair of layers, one KV head at a time (peak memory: two
    ``[group, queries, distant]`` distributions)."""
    (q_a, s_a), (q_m, s_m) = anchor, member
    hkv = k_anchor.shape[0]
    g = q_a.shape[0] // hkv
    total = 0.0
    for h in range(hkv):
        group = slice(h * g, (h + 1) * g)
        mine = _attention(q_m[group], k_member[h : h + 1, distant], s_m)
        if how == "attention":
            other = _attention(q_a[group], k_anchor[h : h + 1, distant], s_a)
        else:  # the member's queries on the anchor's keys: what PoD computes
            other = _attention(q_m[group], k_anchor[h : h + 1, distant], s_m)
        if heads == "group":
            mine, other = mine.mean(0), other.mean(0)
        total += float(jsd(mine, other).sum())
    return total / ((hkv if heads == "group" else q_m.shape[0]) * q_m.shape[1])


def _distant_mass(query: torch.Tensor, scaling: float, keys: torch.Tensor, sinks: int, horizon: int) -> float:
    """Mean share of the observed queries' attention (over every key each one sees) that
    goes to the distant keys ``sinks <= p < horizon``; one KV head at a time."""
    hq, w, d = query.shape
    hkv, t = keys.shape[0], keys.shape[1]
    g = hq // hkv
    q_pos = torch.arange(t - w, t, device=keys.device).repeat(g)  # row r of a group is query r % w
    hidden = torch.arange(t, device=keys.device).view(1, -1) > q_pos.view(-1, 1)
    total = 0.0
    for h in range(hkv):
        q = query[h * g : (h + 1) * g].reshape(g * w, d)
        logits = torch.matmul(q, keys[h].float().transpose(0, 1)) * scaling  # [g*W, T]
        lse_all = torch.logsumexp(logits.masked_fill(hidden, -math.inf), dim=-1)
        lse_dist = torch.logsumexp(logits[:, sinks:horizon], dim=-1)
        total += float(torch.exp(lse_dist - lse_all).sum())
    return total / (hq * w)


def calibrate(
    model,
    ids,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_block: int = DEFAULT_MAX_BLOCK,
    n_blocks: int | None = None,
    queries: int = DEFAULT_QUERIES,
    recent: int | None = None,
    sinks: int = DEFAULT_SINKS,
    how: str = "attention",
    heads: str = "group",
    chunk_size: int = defaults.CHUNK_SIZE,
    backend: str = "auto",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Calibration:
    """Measure (``measure``) and group (``choose_blocks``): the ``Calibration`` with blocks."""
    check_rule(threshold, max_block, n_blocks)  # before the measurement, not after it
    # The threshold rule compares a block's anchor with layers up to max_block - 1 later;
    # the count rule only needs consecutive pairs.
    band = 1 if n_blocks is not None else (None if max_block == 0 else max(1, max_block - 1))
    cal = measure(
        model,
        ids,
        queries=queries,
        recent=recent,
        sinks=sinks,
        how=how,
        heads=heads,
        band=band,
        chunk_size=chunk_size,
        backend=backend,
        on_progress=on_progress,
    )
    cal.blocks = choose_blocks(cal.growing, cal.matrix, threshold=threshold, max_block=max_block, n_blocks=n_blocks)
    cal.rule = (
        {"rule": "blocks", "n_blocks": n_blocks}
        if n_blocks is not None
        else {"rule": "threshold", "threshold": threshold, "max_block": max_block}
    )
    return cal


# ---- the profile file ------------------------------------------------------------------------------
def write_profile(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a temporary file beside it, renamed)."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")
