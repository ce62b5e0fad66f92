"""What a forward records about attention: the statistics scored methods rank entries by.

The engine hands one collector to each forward that should record something (``RunState.
collector``); the attention function calls it once per growing layer with that layer's
post-RoPE queries and keys.  Everything is computed on a bounded set of queries, so no
method needs eager attention or memory quadratic in the document.

* ``WindowStats``: the last ``window`` queries of a prefill chunk (the observation window).
  H2O's ``scores`` accumulate their attention; SnapKV's ``obs`` holds the latest window.
* ``ProbeStats``: the trailing queries are a question that only observes (query-aware
  scoring).  With several questions, ``obs`` keeps the largest attention any of them paid.
* ``ReconStats``: the queries reconstruct the newest context entries (KVzip's "repeat the
  previous context" pass, see ``kvcli.engine.scoring``).  An entry's importance is the
  largest attention probability it receives from any reconstruction query of any query
  head in its KV group; ``scores`` and ``obs`` both hold it, max-accumulated.  By default
  the pass also *attends* only over the sinks, the chunk and itself (``attends``): the
  collector then computes the layer's output and its statistics from one softmax.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..cache import GrowingLayer
from .reference import received_attention

KeyArg = torch.Tensor | tuple[torch.Tensor, ...]

#: Reconstruction queries scored at a time (bounds the logits held to this many rows).
RECON_QUERY_BLOCK = 256


class Collector:
    """Records statistics for one forward; called per growing layer by the attention function."""

    #: The forward's own output is not used (a probe): the reference attention computes it.
    observe_only: ClassVar[bool] = False
    #: The collector computes the layer's attention output itself (``attend``), over the keys
    #: it chooses, instead of being called after the run's backend.
    attends: bool = False

    def __call__(
        self,
        layer: GrowingLayer,
        query: torch.Tensor,
        key: KeyArg,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
    ) -> None:
        raise NotImplementedError

    def attend(self, layer, query, key, value, q_pos, k_pos, bias, scaling, pending=None) -> torch.Tensor:
        """The layer's attention output ``[B, Hq, Lq, Dv]``, recording statistics on the way
        (only for collectors with ``attends``).  ``pending``: the forward's own keys and
        values when the layer did not store them (a detached pass, ``GrowingLayer.pending``);
        ``key``/``value``/``k_pos``/``bias`` then cover the stored context only."""
        raise NotImplementedError


@dataclass
class WindowStats(Collector):
    """Attention from the last ``window`` queries of the forward (a prefill chunk)."""

    window: int

    def __call__(self, layer, query, key, q_pos, k_pos, bias, scaling) -> None:
        w = min(self.window, query.shape[2])
        layer.add_scores(received_attention(query[:, :, -w:], key, q_pos[-w:], k_pos, bias, scaling))


@dataclass
class ProbeStats(Collector):
    """Attention from the trailing ``length`` queries (a question); ``first``: the first of
    this chunk's questions (it replaces ``obs``; later ones keep the maximum)."""

    observe_only: ClassVar[bool] = True

    length: int
    first: bool = True

    def __call__(self, layer, query, key, q_pos, k_pos, bias, scaling) -> None:
        n = self.length
        received = received_attention(query[:, :, -n:], key, q_pos[-n:], k_pos, bias, scaling)
        layer.add_scores(received, obs_max=not self.first)


@dataclass
class ReconStats(Collector):
    """Importance of the newest ``n_chunk`` context entries from a reconstruction pass.

    The forward's queries (the repeat prompt, then the chunk's own tokens, teacher-forced)
    were appended after the context, so a layer holds ``context | reconstruction`` and the
    chunk being reconstructed is the end of the context.  As KVzip does, each query's
    softmax is taken over the sinks, the chunk and the reconstruction itself (``local``):
    older entries, scored by their own chunk's pass, are not re-normalised against it.
    ``local=False`` takes the softmax over the whole cache instead (every entry can gain).

    ``attends`` (the default): the pass attends over those same keys (sinks, chunk,
    reconstruction), so one softmax gives both the layer's output and the statistics, and the
    pass costs about one forward of the chunk whatever the length of the context before it.
    ``attends=False``: the pass attends over the whole cache (as KVzip's does) through the
    run's backend, and the statistics are a second computation over the selected keys.
    """

    n_chunk: int
    n_sink: int
    local: bool = True
    attends: bool = True
    # The chunk's first ``header`` entries are the prompt template's header (the pass does not
    # copy them, ``ReconPrompt.header``): they get the largest score, 1, as sinks are kept.
    header: int = 0

    def __post_init__(self) -> None:
        if self.attends and not self.local:
            raise ValueError("a pass that attends locally normalises locally: attends needs local")

    def _local(self, lk: int, lq: int, device: torch.device) -> tuple[torch.Tensor, int, slice]:
        """The keys a local softmax spans (sinks, then the chunk and the reconstruction) as
        indices, the chunk's first entry in the layer, and the chunk's place among those keys."""
        n_ctx = lk - lq
        start = max(0, n_ctx - self.n_chunk)
        sinks = min(self.n_sink, start)
        sel = torch.cat([torch.arange(sinks), torch.arange(start, lk)]).to(device)
        return sel, start, slice(sinks, sinks + n_ctx - start)

    def _raise(self, layer, best: torch.Tensor, at: int) -> None:
        """Max-accumulate ``best`` (entries ``at ..``, ending with the chunk) into the layer."""
        if self.header:
            first = best.shape[-1] - self.n_chunk  # the chunk's first entry in ``best``
            best = best.clone()
            best[..., first : first + self.header] = 1.0
        layer.raise_scores(best, at)

    def __call__(self, layer, query, key, q_pos, k_pos, bias, scaling) -> None:
        keys = _joined(key)
        lq, lk = query.shape[2], keys.shape[2]
        if self.local:
            sel, at, chunk = self._local(lk, lq, keys.device)
        else:
            sel, at, chunk = torch.arange(lk, device=keys.device), 0, slice(0, lk - lq)
        sel_bias = None if bias is None else bias.index_select(-1, sel)
        best = max_attention(query, keys.index_select(2, sel), q_pos, k_pos.index_select(-1, sel), sel_bias, scaling)
        self._raise(layer, best[..., chunk], at)

    def attend(self, layer, query, key, value, q_pos, k_pos, bias, scaling, pending=None) -> torch.Tensor:
        keys = _joined(key)
        if pending is None:  # the pass's entries are the last keys of the layer
            sel, at, chunk = self._local(keys.shape[2], query.shape[2], keys.device)
            k, v, kp = keys.index_select(2, sel), value.index_select(2, sel), k_pos.index_select(-1, sel)
            b = None if bias is None else bias.index_select(-1, sel)
        else:  # a detached pass: the layer holds the context only, the pass's entries come apart
            sel, at, chunk = self._local(keys.shape[2], 0, keys.device)
            own_k, own_v = pending
            n = own_k.shape[2]
            k = torch.cat([keys.index_select(2, sel), own_k], dim=2)
            v = torch.cat([value.index_select(2, sel), own_v], dim=2)
            own_pos = q_pos.to(k_pos.dtype).view(1, 1, n).expand(*k_pos.shape[:2], n)
            kp = torch.cat([k_pos.index_select(-1, sel), own_pos], dim=-1)
            # the pass's own entries are single tokens: count 1, a log-count bias of 0
            b = None
            if bias is not None:
                b = torch.cat([bias.index_select(-1, sel), bias.new_zeros((*bias.shape[:2], n))], dim=-1)
        out, best = attend_max(query, k, v, q_pos, kp, b, scaling)
        self._raise(layer, best[..., chunk], at)
        return out


def _joined(key: KeyArg) -> torch.Tensor:
    return key if isinstance(key, torch.Tensor) else torch.cat(key, dim=2)


def max_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The largest attention probability each key receives from any query of any query head
    in its KV group: ``[B, Hkv, Lk]`` (float32).  Queries are taken ``RECON_QUERY_BLOCK`` at
    a time (each softmax row is independent), so the logits held stay bounded."""
    b, hkv, lk = key.shape[0], key.shape[1], key.shape[2]
    best = torch.zeros((b, hkv, lk), dtype=torch.float32, device=key.device)
    for _, _, hi, probs in _block_probs(query, key, q_pos, k_pos, bias, scaling):
        best[..., :hi] = torch.maximum(best[..., :hi], probs.amax(dim=(2, 3)))
    return best


def attend_max(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its statistics from one softmax: the output ``[B, Hq, Lq, Dv]`` (query's
    dtype, causal by position, ``bias`` added) and ``max_attention``'s ``[B, Hkv, Lk]``.

    Eager (the probabilities are needed), so meant for short key sets such as a local
    reconstruction pass's."""
    b, hq, lq, _ = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    v = value.float().unsqueeze(2)  # [B, Hkv, 1, Lk, Dv]
    # A block with no key visible keeps a zero output: no key contributes to it.
    out = torch.zeros((b, hkv, hq // hkv, lq, value.shape[-1]), dtype=torch.float32, device=query.device)
    best = torch.zeros((b, hkv, lk), dtype=torch.float32, device=key.device)
    for s, n, hi, probs in _block_probs(query, key, q_pos, k_pos, bias, scaling):
        best[..., :hi] = torch.maximum(best[..., :hi], probs.amax(dim=(2, 3)))
        out[:, :, :, s : s + n] = torch.matmul(probs, v[:, :, :, :hi])
    return out.reshape(b, hq, lq, -1).to(query.dtype), best


def _block_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """Attention probabilities ``RECON_QUERY_BLOCK`` queries at a time: ``(first query, n,
    hi, probs)`` with ``probs`` ``[B, Hkv, G, n, hi]`` (float32, the queries of a KV group
    stacked).  Blocks whose queries see no key are skipped.

    Per block, logits are computed only up to the last key some query of the block can see
    (the keys after it receive nothing), and the causal mask is applied only from the first
    key some query of the block cannot see (every key before it is visible to all of them):
    in a reconstruction pass that leaves the mask to the reconstruction's own keys."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    k = key.float().transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, D, Lk]: one key set per group
    flat_pos = k_pos.reshape(-1, lk)  # every (batch, head) row of positions
    k_pos = k_pos.unsqueeze(2).unsqueeze(3)  # [B, H', 1, 1, Lk]
    extra = None if bias is None else bias.float().unsqueeze(2).unsqueeze(3)
    for s in range(0, lq, RECON_QUERY_BLOCK):
        qp = q_pos[s : s + RECON_QUERY_BLOCK]
        n = qp.shape[0]
        lo, hi = _mask_span(flat_pos, int(qp.min()), int(qp.max()))
        if hi == 0:  # no key visible to any query of the block
            continue
        q = query[:, :, s : s + n].float().reshape(b, hkv, g, n, d)
        logits = torch.matmul(q, k[..., :hi]).mul_(scaling)  # [B, Hkv, G, n, hi]
        if extra is not None:
            logits.add_(extra[..., :hi])
        if hi > lo:  # masked in place, broadcast (nothing expanded to G x n x Lk)
            logits[..., lo:hi].masked_fill_(k_pos[..., lo:hi] > qp.view(1, 1, 1, n, 1), -math.inf)
        yield s, n, hi, torch.softmax(logits, dim=-1)


def _mask_span(positions: torch.Tensor, first: int, last: int) -> tuple[int, int]:
    """``(lo, hi)`` for queries at positions ``first..last`` over keys at ``positions``
    (``[rows, Lk]``): keys before ``lo`` are visible to all of them, keys from ``hi`` on to
    none, so only ``lo:hi`` needs the mask (any order of positions; ``lo <= hi``)."""
    lk = positions.shape[-1]
    hidden = (positions > first).any(dim=0)
    lo = int(hidden.int().argmax()) if bool(hidden.any()) else lk
    seen = (positions <= last).any(dim=0)
    hi = lk - int(seen.flip(0).int().argmax()) if bool(seen.any()) else 0
    return min(lo, hi), hi
