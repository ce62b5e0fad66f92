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
        mask = torch.where(
            ok, bias.unsqueeze(2).to(query.dtype), torch.tensor(-math.inf, dtype=query.dtype, device=query.device)
        )
    else:
        mask = ok
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
    ok = (
        ok.unsqueeze(2)
        .expand(ok.shape[0], ok.shape[1], g, lq, ok.shape[-1])
        .reshape(ok.shape[0], ok.shape[1], g * lq, -1)
    )
    logits = logits.masked_fill(~ok, -math.inf)
    return torch.softmax(logits, dim=-1).sum(dim=2)
