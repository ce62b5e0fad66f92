"""Torch reference attention over a (possibly compressed) cache, and the statistics methods need.

Masks come from each entry's logical position (a compressed cache is no longer a
contiguous run of positions); merged entries may carry a per-entry bias.  Every other
backend (``backends``: Triton kernels, flash-attn) is tested against ``attend``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[B, H|1, Lq, Lk]`` bool: key visible to query (causal by logical position, sliding window)."""
    qp = q_pos.view(1, 1, -1, 1)
    kp = k_pos.unsqueeze(2)
    ok = kp <= qp
    if window is not None:
        ok = ok & (qp - kp < window)
    return ok


def mask_positions(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Key positions ``[B, H', Lk]`` the mask can be built from: one row for all KV heads
    (``[B, 1, Lk]``) when the heads' positions differ only at keys every query sees.

    A compressed cache keeps different entries per KV head, but a prefill chunk's queries
    come after all of them; only the chunk's own keys, the same in every head, need the
    causal mask.  A mask shared by the heads is the same mask, a third (SmolLM2) of the size:
    the per-head one (and the float copy the kernel makes of it) was about 100 MiB for one
    layer of 512 queries over 4K keys, more than the transient of the full cache's.
    """
    if window is not None or k_pos.shape[1] == 1:
        return k_pos
    differ = (k_pos != k_pos[:, :1]).any(dim=1, keepdim=True)  # [B, 1, Lk]
    if bool((differ & (k_pos > q_pos.min())).any()):  # some head's key is hidden from some query
        return k_pos
    return k_pos[:, :1]


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
    padded = False
    if bias is not None:
        # The log-count bias as one more dimension of the dot product (query 1, key
        # bias / scaling): the mask stays boolean and shared by the heads, where adding the
        # bias to it made a float mask per KV head and query (the size of the logits).  The
        # values get a zero column too: the fused CPU kernel wants them as wide as the keys.
        query = torch.cat([query, query.new_ones((b, hq, lq, 1))], dim=-1)
        extra = (bias.to(torch.float32) / scaling).to(key.dtype).expand(b, hkv, lk).unsqueeze(-1)
        key = torch.cat([key, extra], dim=-1)
        padded = value.shape[-1] == d
        if padded:
            value = torch.cat([value, value.new_zeros((*value.shape[:3], 1))], dim=-1)
        d += 1
    mask = allowed_mask(q_pos, mask_positions(q_pos, k_pos, window), window)  # [B, H' or 1, Lq, Lk]
    if g > 1:
        q = query.reshape(b, hkv, g * lq, d)
        mask = (
            mask.unsqueeze(2)
            .expand(mask.shape[0], mask.shape[1], g, lq, lk)
            .reshape(mask.shape[0], mask.shape[1], g * lq, lk)
        )
    else:
        q = query
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)
    if padded:  # the values' zero column
        out = out[..., :-1]
    return out.reshape(b, hq, lq, out.shape[-1])


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
    ok = (
        ok.unsqueeze(2)
        .expand(ok.shape[0], ok.shape[1], g, lq, ok.shape[-1])
        .reshape(ok.shape[0], ok.shape[1], g * lq, -1)
    )
    logits = logits.masked_fill(~ok, -math.inf)
    return torch.softmax(logits, dim=-1).sum(dim=2)
