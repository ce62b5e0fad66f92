"""kvcli's attention function, registered with transformers' attention-function registry.

Why a function of our own: a compressed cache is no longer a contiguous run of positions,
so the causal mask must come from each entry's logical position, merged entries may carry
a log-count bias, and methods need attention statistics.  Doing this here (instead of in
patched model classes) keeps every architecture transformers supports working.

Masks are built from positions, so transformers is asked for none: "kvcli" is not in its
mask registry, which makes it skip mask construction entirely.

Which function computes the attention is the run's backend (``backends``: the torch
reference ``attend`` below, kvcli's Triton kernels, or flash-attn where it is exact).

Statistics are collected on a bounded observation window (the last ``obs_window`` queries
of each forward), so no method needs eager attention or memory quadratic in the document.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import GrowingLayer, KVCache, SharedKeyLayer

ATTN_NAME = "kvcli"


@dataclass
class RunState:
    """Per-run settings the attention function needs; passed to the model as a kwarg."""

    cache: KVCache
    count_bias: bool = False  # add log(count) to merged entries' logits
    collect_stats: bool = False  # record attention received (methods that score entries)
    obs_window: int = 64
    backend: str = "sdpa"
    probe_len: int = 0  # trailing query tokens that form the observation window instead (query-aware)
    extra: dict = field(default_factory=dict)
    # Called as ``observer(layer_idx, query, q_pos, scaling)`` after every layer's attention
    # (post-RoPE queries of the current forward; ``kvcli calibrate`` keeps a few of them).
    observer: Callable | None = None


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[B, H|1, Lq, Lk]`` bool: key visible to query (causal by logical position, sliding window)."""
    qp = q_pos.view(1, 1, -1, 1)
    kp = k_pos.unsqueeze(2)
    ok = kp <= qp
    if window is not None:
        ok = ok & (qp - kp < window)
    return ok


def _heads_share_positions(layer) -> bool:
    return not isinstance(layer, GrowingLayer) or layer.positions is None or layer.positions.shape[1] == 1


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    window: int | None,
) -> torch.Tensor:
    """Torch reference attention over a (possibly compressed) cache.

    query ``[B, Hq, Lq, D]``; key/value ``[B, Hkv, Lk, D]`` (never expanded to Hq: queries
    of a group are stacked instead); positions give the mask; ``bias`` ``[B, Hkv, Lk]`` is
    added to the logits.  Returns ``[B, Hq, Lq, Dv]``.
    """
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    ok = allowed_mask(q_pos, k_pos, window)  # [B, H', Lq, Lk]
    if bias is not None:
        mask = torch.where(ok, bias.unsqueeze(2).to(query.dtype), torch.tensor(-math.inf, dtype=query.dtype, device=query.device))
    else:
        mask = ok
    if g > 1:
        q = query.reshape(b, hkv, g * lq, d)
        mask = mask.unsqueeze(2).expand(mask.shape[0], mask.shape[1], g, lq, lk).reshape(mask.shape[0], mask.shape[1], g * lq, lk)
    else:
        q = query
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, hq, lq, value.shape[-1])


def received_attention(
    query: torch.Tensor,
    key: torch.Tensor | tuple[torch.Tensor, ...],
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention each key receives from the given queries, summed over queries and the
    query heads of its group: ``[B, Hkv, Lk]`` (float32).  ``key`` may be given as parts
    (consecutive runs of entries, e.g. ``SharedKeyLayer.key_parts()``): they are not joined."""
    parts = (key,) if isinstance(key, torch.Tensor) else tuple(key)
    b, hq, lq, d = query.shape
    hkv = parts[0].shape[1]
    g = hq // hkv
    q = query.reshape(b, hkv, g * lq, d).float()
    pieces = [torch.matmul(q, k.float().transpose(-1, -2)) for k in parts]
    logits = (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)) * scaling
    if bias is not None:
        logits = logits + bias.unsqueeze(2).float()
    ok = allowed_mask(q_pos, k_pos, None)
    ok = ok.unsqueeze(2).expand(ok.shape[0], ok.shape[1], g, lq, ok.shape[-1]).reshape(ok.shape[0], ok.shape[1], g * lq, -1)
    logits = logits.masked_fill(~ok, -math.inf)
    return torch.softmax(logits, dim=-1).sum(dim=2)


def kvcli_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    state: RunState | None = kwargs.get("kvcli_state")
    if state is None:
        raise RuntimeError("the 'kvcli' attention implementation runs only inside kvcli's engine")
    if kwargs.get("softcap") is not None:
        raise RuntimeError("attention logit soft-capping is not supported by kvcli")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = state.cache.layers[module.layer_idx]
    q_pos = state.cache.clock.positions.to(query.device)
    k_pos = layer.key_positions()
    if _heads_share_positions(layer):
        k_pos = k_pos[:, :1]
    bias = None
    if state.count_bias and isinstance(layer, GrowingLayer) and layer.counts is not None:
        bias = torch.log(layer.entry_counts())
    window = sliding_window if not isinstance(layer, GrowingLayer) else None
    # A PoD member whose keys the cache did not assemble (split_keys): read them in place.
    split = isinstance(layer, SharedKeyLayer) and layer.split_keys
    if split:
        parts = layer.key_parts()

    if split and not state.probe_len:
        out = _pod_member_attention(layer, parts, query, value, q_pos, k_pos, bias, scaling, window)
    else:
        if split:
            key = torch.cat(parts, dim=2)
        if state.probe_len:
            # Query-aware scoring: the trailing probe tokens (the user's question) only observe.
            out = attend(query, key, value, q_pos, k_pos, bias, scaling, window)
        else:
            out = _dispatch(state.backend)(query, key, value, q_pos, k_pos, bias, scaling, window)

    if state.collect_stats and isinstance(layer, GrowingLayer) and layer.track_scores:
        w = state.probe_len or min(state.obs_window, query.shape[2])
        received = received_attention(query[:, :, -w:], parts if split else key, q_pos[-w:], k_pos, bias, scaling)
        layer.add_scores(received)
    if state.observer is not None:
        state.observer(module.layer_idx, query, q_pos, scaling)
    return out.transpose(1, 2).contiguous(), None


def _dispatch(backend: str):
    if backend == "sdpa":
        return attend
    from .backends import get_backend

    return get_backend(backend)


def _pod_member_attention(layer, parts, query, value, q_pos, k_pos, bias, scaling, window):
    """Triton PoD kernel: the anchor's distant keys are read where they are; only the
    member's own proximal parts (head sinks + recent tail, bounded) are joined."""
    from .backends import triton_pod_attend

    head, distant, tail = parts
    h, nd = head.shape[2], distant.shape[2]

    def distant_proximal(t):
        if t is None:
            return None, None
        return t[:, :, h : h + nd], torch.cat([t[:, :, :h], t[:, :, h + nd :]], dim=2)

    vd, vp = distant_proximal(value)
    pd, pp = distant_proximal(k_pos)
    bd, bp = distant_proximal(bias)
    return triton_pod_attend(query, (distant, vd, pd, bd), (torch.cat([head, tail], dim=2), vp, pp, bp),
                             q_pos, scaling, window)


AttentionInterface.register(ATTN_NAME, kvcli_attention)
