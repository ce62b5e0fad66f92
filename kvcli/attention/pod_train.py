"""Differentiable PoD attention over a whole sequence, without a cache (``kvcli adapt``).

Inference PoD (``methods.pod`` with ``cache.SharedKeyLayer``) is a chunked prefill: after
each chunk the members of a block forget their own keys of entries older than the recent
window, and from then on read those entries' keys from the block's anchor.  Training needs
the same computation in one forward with autograd, so here a member layer's queries of
chunk ``c`` attend with one softmax over

* their own keys of the first ``n_sink`` positions and of positions ``>= horizon_c``,
* the anchor's keys (post-RoPE, stashed by the anchor in the same forward) of positions in
  ``[n_sink, horizon_c)``,

and the member's own values everywhere; ``horizon_c`` is the horizon PoD computed after the
previous chunk (``TrainAttention.plan``, from ``PoD.recent_window``).  This is exactly what
the engine computes for a plain ``pod`` prefill of the same tokens with the same chunk size
(tested), so what is trained is what runs.  Every other layer, and every layer when
``pod`` is False (the teacher), attends causally over the whole sequence.

Used through ``function.kvcli_attention``: a forward that passes ``kvcli_train=`` a
``TrainAttention`` runs here instead of over kvcli's cache.  Plain ``pod`` only (no inner
method), torch only (the Triton kernels stay inference-only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .reference import attend

#: ``(start, end, horizon)`` of each prefill chunk: queries ``start..end-1`` read the anchor's
#: keys of positions ``[n_sink, horizon)`` (none while ``horizon <= n_sink``).
Chunk = tuple[int, int, int]


def chunk_plan(total: int, chunk_size: int, recent_window: Callable[[int], int]) -> list[Chunk]:
    """The chunks of a prefill of ``total`` tokens and the horizon in force during each:
    PoD compresses after every chunk, with ``seen`` = the tokens so far."""
    out: list[Chunk] = []
    horizon = 0
    for start in range(0, total, chunk_size):
        end = min(total, start + chunk_size)
        out.append((start, end, horizon))
        horizon = max(horizon, end - recent_window(end))  # members' tails only shrink
    return out


@dataclass
class TrainAttention:
    """What one training forward needs (passed as the ``kvcli_train`` keyword)."""

    anchor_of: dict[int, int]  # member layer -> its block's anchor layer
    n_sink: int
    chunks: list[Chunk]
    pod: bool = True  # False: full causal attention in every layer (the teacher)
    stash: dict[int, torch.Tensor] = field(default_factory=dict)  # anchor layer -> post-RoPE keys
    queries: torch.Tensor | None = None  # members compute only these query rows (sorted; others 0)

    @property
    def anchors(self) -> set[int]:
        return set(self.anchor_of.values())


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, window: int | None):
    """Plain causal attention over one whole sequence (grouped-query aware)."""
    if window is not None:
        pos = torch.arange(query.shape[2], device=query.device)
        return attend(query, key, value, pos, pos.unsqueeze(0).unsqueeze(0), None, scaling, window)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)


def pod_member_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    anchor_key: torch.Tensor,
    n_sink: int,
    chunks: list[Chunk],
    scaling: float,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """A member layer's attention, chunk by chunk (see the module docstring).  ``query``
    ``[B, Hq, T, D]``; ``key``/``value``/``anchor_key`` ``[B, Hkv, T, D]``.  ``queries``:
    compute only these rows (sorted positions), the others are zero (a layer-local loss
    reads only them: the attention's cost shrinks with them)."""
    outs = []
    out = None if queries is None else query.new_zeros(query.shape[:3] + value.shape[-1:])
    for start, end, horizon in chunks:
        m = min(n_sink, horizon)
        if horizon > m:
            keys = torch.cat([key[:, :, :m], anchor_key[:, :, m:horizon], key[:, :, horizon:end]], dim=2)
        else:
            keys = key[:, :, :end]
        k_pos = torch.arange(end, device=query.device).view(1, 1, -1)
        if out is not None and queries is not None:
            rows = queries[(queries >= start) & (queries < end)]
            if rows.numel():
                part = attend(query[:, :, rows], keys, value[:, :, :end], rows, k_pos, None, scaling, None)
                out = out.index_copy(2, rows, part)
            continue
        q_pos = torch.arange(start, end, device=query.device)
        outs.append(attend(query[:, :, start:end], keys, value[:, :, :end], q_pos, k_pos, None, scaling, None))
    return torch.cat(outs, dim=2) if out is None else out


def train_attention(
    module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state: TrainAttention, scaling: float, window
) -> torch.Tensor:
    """``[B, Hq, T, D]``: the layer's attention in a training forward."""
    idx = module.layer_idx
    if idx in state.anchors:
        state.stash[idx] = key
    if state.pod and idx in state.anchor_of:
        anchor_key = state.stash[state.anchor_of[idx]]
        return pod_member_attention(query, key, value, anchor_key, state.n_sink, state.chunks, scaling, state.queries)
    return causal_attention(query, key, value, scaling, window)
