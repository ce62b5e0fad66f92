"""Pure-torch reference implementations (the source of truth for the Triton kernels).

Everything here is vectorised (no Python loop per token) and computes in float32,
returning the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["adjacent_cosine", "merge_sets", "attention", "pod_attention", "COSINE_EPS"]

# Norms below this are clamped; a zero vector therefore has cosine 0 with anything.
COSINE_EPS = 1e-8

_VALUE_MODES = ("scale", "bias")


def adjacent_cosine(keys: Tensor) -> Tensor:
    """Cosine similarity between entries i and i+1 of each row.

    keys: [N, L, D] -> float32 [N, max(L-1, 0)].
    """
    if keys.dim() != 3:
        raise ValueError(f"keys must be [N, L, D], got shape {tuple(keys.shape)}")
    n, length, _ = keys.shape
    if length < 2:
        return torch.zeros(n, 0, dtype=torch.float32, device=keys.device)
    k = keys.float()
    a, b = k[:, :-1], k[:, 1:]
    dot = (a * b).sum(-1)
    na = a.square().sum(-1).sqrt().clamp_min(COSINE_EPS)
    nb = b.square().sum(-1).sqrt().clamp_min(COSINE_EPS)
    return dot / (na * nb)


def _check_merge_args(keys, values, counts, set_ids, pivots, sigma, value_mode):
    if keys.dim() != 3 or values.dim() != 3:
        raise ValueError("keys must be [N, L, D] and values [N, L, Dv]")
    n, length, _ = keys.shape
    if values.shape[:2] != (n, length):
        raise ValueError(f"values shape {tuple(values.shape)} does not match keys {tuple(keys.shape)}")
    if counts.shape != (n, length) or set_ids.shape != (n, length):
        raise ValueError("counts and set_ids must be [N, L]")
    if pivots.dim() != 2 or pivots.shape[0] != n:
        raise ValueError("pivots must be [N, S]")
    if value_mode not in _VALUE_MODES:
        raise ValueError(f"value_mode must be one of {_VALUE_MODES}, got {value_mode!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")


def merge_sets(
    keys: Tensor,
    values: Tensor,
    counts: Tensor,
    set_ids: Tensor,
    pivots: Tensor,
    sigma: float,
    value_mode: str,
    count_weighted: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian-kernel weighted merge of contiguous sets (KVMerger).

    For set s with pivot p and members i: g_i = exp(-||k_p - k_i||^2 / (2 sigma^2))
    (times counts_i if count_weighted), w_i = g_i / sum_j g_j.  Merged key/value are the
    w-weighted sums; with value_mode "scale" the value is multiplied by |s|.  Merged count
    is the sum of member counts.  Degenerate case (all g zero, only possible with zero
    counts): weight 1 on the pivot.

    Returns (merged_keys [N,S,D], merged_values [N,S,Dv], merged_counts [N,S]) in the
    input dtypes.
    """
    _check_merge_args(keys, values, counts, set_ids, pivots, sigma, value_mode)
    n, length, d = keys.shape
    dv = values.shape[2]
    s = pivots.shape[1]
    dev = keys.device
    if n == 0 or s == 0 or length == 0:
        return (
            torch.zeros(n, s, d, dtype=keys.dtype, device=dev),
            torch.zeros(n, s, dv, dtype=values.dtype, device=dev),
            torch.zeros(n, s, dtype=counts.dtype, device=dev),
        )
    set_ids = set_ids.long()
    pivots = pivots.long()
    k = keys.float()
    v = values.float()
    c = counts.float()

    piv_of_entry = torch.gather(pivots, 1, set_ids)  # [N, L] index of own pivot
    pk = torch.gather(k, 1, piv_of_entry.unsqueeze(-1).expand(-1, -1, d))  # [N, L, D]
    d2 = (pk - k).square().sum(-1)
    g = torch.exp(-d2 / (2.0 * float(sigma) ** 2))
    if count_weighted:
        g = g * c

    def set_sum(x: Tensor) -> Tensor:  # [N, L] -> [N, S]
        return torch.zeros(n, s, dtype=x.dtype, device=dev).scatter_add_(1, set_ids, x)

    denom = set_sum(g)
    is_pivot = piv_of_entry == torch.arange(length, device=dev).unsqueeze(0)
    degenerate = torch.gather(denom, 1, set_ids) <= 0
    g = torch.where(degenerate, is_pivot.float(), g)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    w = g / torch.gather(denom, 1, set_ids)  # [N, L]

    idx_k = set_ids.unsqueeze(-1).expand(-1, -1, d)
    idx_v = set_ids.unsqueeze(-1).expand(-1, -1, dv)
    mk = torch.zeros(n, s, d, dtype=torch.float32, device=dev).scatter_add_(1, idx_k, w.unsqueeze(-1) * k)
    mv = torch.zeros(n, s, dv, dtype=torch.float32, device=dev).scatter_add_(1, idx_v, w.unsqueeze(-1) * v)
    if value_mode == "scale":
        sizes = set_sum(torch.ones_like(w))
        mv = mv * sizes.unsqueeze(-1)
    mc = set_sum(c)
    return mk.to(keys.dtype), mv.to(values.dtype), mc.to(counts.dtype)


def _check_attention_args(q, k, v, q_pos, k_pos, bias):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, H, L, D]")
    b, hq, lq, d = q.shape
    bk, hkv, lk, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"k shape {tuple(k.shape)} incompatible with q {tuple(q.shape)}")
    if v.shape[:3] != (b, hkv, lk):
        raise ValueError(f"v shape {tuple(v.shape)} incompatible with k {tuple(k.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq={hq} must be a positive multiple of Hkv={hkv}")
    if q_pos.shape != (b, lq):
        raise ValueError(f"q_pos must be [B, Lq]={(b, lq)}, got {tuple(q_pos.shape)}")
    if k_pos.shape != (b, hkv, lk):
        raise ValueError(f"k_pos must be [B, Hkv, Lk]={(b, hkv, lk)}, got {tuple(k_pos.shape)}")
    if bias is not None and bias.shape != (b, hkv, lk):
        raise ValueError(f"bias must be [B, Hkv, Lk]={(b, hkv, lk)}, got {tuple(bias.shape)}")


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    bias: Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
) -> Tensor:
    """Masked grouped-query attention with arbitrary positions and per-key bias.

    q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv], q_pos [B,Lq], k_pos [B,Hkv,Lk],
    bias [B,Hkv,Lk] or None.  Key j is visible to query i iff k_pos[j] <= q_pos[i] and
    (no window or q_pos[i] - k_pos[j] < sliding_window).  Rows with no visible key give 0.
    """
    _check_attention_args(q, k, v, q_pos, k_pos, bias)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    if lk == 0 or lq == 0:
        return torch.zeros(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    # Group query heads onto their kv head instead of expanding k/v.
    qf = q.float().reshape(b, hkv, g * lq, d)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)) * float(scaling)  # [B,Hkv,G*Lq,Lk]
    if bias is not None:
        logits = logits + bias.float().unsqueeze(2)
    qp = q_pos.long().repeat(1, g).view(b, 1, g * lq, 1)
    kp = k_pos.long().unsqueeze(2)  # [B,Hkv,1,Lk]
    allowed = kp <= qp
    if sliding_window is not None:
        allowed = allowed & (qp - kp < int(sliding_window))
    masked = logits.masked_fill(~allowed, float("-inf"))
    m = masked.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(masked - m)  # exp(-inf) = 0 for masked entries
    l = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v.float())
    out = torch.where(l > 0, out / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(out))
    return out.reshape(b, hq, lq, dv).to(q.dtype)


def pod_attention(
    q: Tensor,
    k_prox: Tensor,
    v_prox: Tensor,
    pos_prox: Tensor,
    k_dist: Tensor,
    v_dist: Tensor,
    pos_dist: Tensor,
    bias_prox: Tensor | None,
    bias_dist: Tensor | None,
    q_pos: Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> Tensor:
    """PoD attention: one softmax over distant (shared from another layer) and proximal keys.

    Exactly `attention` over the concatenation (dist, prox).  A missing bias for one
    part is treated as zeros when the other part has one.
    """
    k = torch.cat([k_dist, k_prox], dim=2)
    v = torch.cat([v_dist, v_prox], dim=2)
    pos = torch.cat([pos_dist.long(), pos_prox.long()], dim=2)
    if bias_prox is None and bias_dist is None:
        bias = None
    else:
        bd = bias_dist if bias_dist is not None else k_dist.new_zeros(k_dist.shape[:3], dtype=torch.float32)
        bp = bias_prox if bias_prox is not None else k_prox.new_zeros(k_prox.shape[:3], dtype=torch.float32)
        bias = torch.cat([bd.float(), bp.float()], dim=2)
    return attention(q, k, v, q_pos, pos, bias, scaling, sliding_window)
