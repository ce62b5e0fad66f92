"""Triton kernels for KVMerger: adjacent key cosine similarity and Gaussian set merging.

Same signatures and semantics as ``reference.adjacent_cosine`` / ``reference.merge_sets``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import TRITON_AVAILABLE, next_pow2, require_triton, tl, triton
from .reference import COSINE_EPS, _check_merge_args

__all__ = ["TRITON_AVAILABLE", "adjacent_cosine_triton", "merge_sets_triton"]


if TRITON_AVAILABLE:

    @triton.jit
    def _adjacent_cosine_kernel(
        k_ptr, out_ptr,
        M, D,
        s_kn, s_kl, s_kd,
        s_on, s_ol,
        EPS: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        n = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        offs_l = blk * BLOCK_L + tl.arange(0, BLOCK_L)  # output index i: pair (i, i+1)
        mask_l = offs_l < M
        base = k_ptr + n * s_kn
        dot = tl.zeros([BLOCK_L], dtype=tl.float32)
        na = tl.zeros([BLOCK_L], dtype=tl.float32)
        nb = tl.zeros([BLOCK_L], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            m2 = mask_l[:, None] & (offs_d[None, :] < D)
            pa = base + offs_l[:, None] * s_kl + offs_d[None, :] * s_kd
            a = tl.load(pa, mask=m2, other=0.0).to(tl.float32)
            b = tl.load(pa + s_kl, mask=m2, other=0.0).to(tl.float32)
            dot += tl.sum(a * b, axis=1)
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(b * b, axis=1)
        den = tl.maximum(tl.sqrt(na), EPS) * tl.maximum(tl.sqrt(nb), EPS)
        tl.store(out_ptr + n * s_on + offs_l * s_ol, dot / den, mask=mask_l)

    @triton.jit
    def _merge_sets_kernel(
        k_ptr, v_ptr, c_ptr, piv_ptr, start_ptr, size_ptr,
        ok_ptr, ov_ptr, oc_ptr,
        S, D, DV,
        s_kn, s_kl, s_kd,
        s_vn, s_vl, s_vd,
        s_cn, s_cl,
        s_pn, s_ps,
        s_okn, s_oks, s_okd,
        s_ovn, s_ovs, s_ovd,
        s_ocn, s_ocs,
        neg_inv_two_sigma2,
        SCALE_VALUES: tl.constexpr, COUNT_WEIGHTED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        # One program per (row n, set s).  Sets are contiguous: [start, start + size).
        n = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1).to(tl.int64)
        start = tl.load(start_ptr + n * S + s)
        size = tl.load(size_ptr + n * S + s)
        piv = tl.load(piv_ptr + n * s_pn + s * s_ps)

        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_d = offs_d < D
        mask_dv = offs_dv < DV
        k_row = k_ptr + n * s_kn
        v_row = v_ptr + n * s_vn
        pk = tl.load(k_row + piv * s_kl + offs_d * s_kd, mask=mask_d, other=0.0).to(tl.float32)
        pv = tl.load(v_row + piv * s_vl + offs_dv * s_vd, mask=mask_dv, other=0.0).to(tl.float32)

        acc_k = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_DV], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
        for m0 in range(0, size, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < size
            idx = start + offs_m
            kk = tl.load(
                k_row + idx[:, None] * s_kl + offs_d[None, :] * s_kd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0,
            ).to(tl.float32)
            vv = tl.load(
                v_row + idx[:, None] * s_vl + offs_dv[None, :] * s_vd,
                mask=mask_m[:, None] & mask_dv[None, :], other=0.0,
            ).to(tl.float32)
            cc = tl.load(c_ptr + n * s_cn + idx * s_cl, mask=mask_m, other=0.0).to(tl.float32)
            diff = kk - pk[None, :]
            d2 = tl.sum(diff * diff, axis=1)
            g = tl.exp(d2 * neg_inv_two_sigma2)
            if COUNT_WEIGHTED:
                g = g * cc
            g = tl.where(mask_m, g, 0.0)
            acc_k += tl.sum(g[:, None] * kk, axis=0)
            acc_v += tl.sum(g[:, None] * vv, axis=0)
            den += g
            cnt += cc
        total = tl.sum(den, axis=0)
        # Singletons pass through exactly; an all-zero weight sum falls back to the pivot.
        use_pivot = (size == 1) | (total <= 0.0)
        safe = tl.where(total > 0.0, total, 1.0)
        out_k = tl.where(use_pivot, pk, acc_k / safe)
        out_v = tl.where(use_pivot, pv, acc_v / safe)
        if SCALE_VALUES:
            out_v = out_v * size.to(tl.float32)
        tl.store(ok_ptr + n * s_okn + s * s_oks + offs_d * s_okd,
                 out_k.to(ok_ptr.dtype.element_ty), mask=mask_d)
        tl.store(ov_ptr + n * s_ovn + s * s_ovs + offs_dv * s_ovd,
                 out_v.to(ov_ptr.dtype.element_ty), mask=mask_dv)
        tl.store(oc_ptr + n * s_ocn + s * s_ocs,
                 tl.sum(cnt, axis=0).to(oc_ptr.dtype.element_ty))


def adjacent_cosine_triton(keys: Tensor) -> Tensor:
    """Triton version of ``reference.adjacent_cosine``: [N, L, D] -> float32 [N, max(L-1, 0)]."""
    require_triton(keys)
    if keys.dim() != 3:
        raise ValueError(f"keys must be [N, L, D], got shape {tuple(keys.shape)}")
    n, length, d = keys.shape
    m = max(length - 1, 0)
    out = torch.zeros(n, m, dtype=torch.float32, device=keys.device)
    if n == 0 or m == 0:
        return out
    if d == 0:
        return out
    block_d = min(next_pow2(d, 16), 128)
    block_l = min(next_pow2(m, 16), 64)
    grid = (n, triton.cdiv(m, block_l))
    _adjacent_cosine_kernel[grid](
        keys, out, m, d,
        keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        EPS=COSINE_EPS, BLOCK_L=block_l, BLOCK_D=block_d,
    )
    return out


def merge_sets_triton(
    keys: Tensor,
    values: Tensor,
    counts: Tensor,
    set_ids: Tensor,
    pivots: Tensor,
    sigma: float,
    value_mode: str,
    count_weighted: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Triton version of ``reference.merge_sets`` (one program per (row, set))."""
    require_triton(keys, values, counts, set_ids, pivots)
    _check_merge_args(keys, values, counts, set_ids, pivots, sigma, value_mode)
    n, length, d = keys.shape
    dv = values.shape[2]
    s = pivots.shape[1]
    dev = keys.device
    out_k = torch.zeros(n, s, d, dtype=keys.dtype, device=dev)
    out_v = torch.zeros(n, s, dv, dtype=values.dtype, device=dev)
    out_c = torch.zeros(n, s, dtype=counts.dtype, device=dev)
    if n == 0 or s == 0 or length == 0:
        return out_k, out_v, out_c
    set_ids = set_ids.long()
    sizes = torch.zeros(n, s, dtype=torch.int64, device=dev)
    sizes.scatter_add_(1, set_ids, torch.ones_like(set_ids))
    starts = (torch.cumsum(sizes, dim=1) - sizes).contiguous()
    sizes = sizes.contiguous()
    pivots = pivots.long()
    block_d = next_pow2(d, 16)
    block_dv = next_pow2(dv, 16)
    block_m = min(next_pow2(int(sizes.max().item()), 16), 32)
    grid = (n, s)
    _merge_sets_kernel[grid](
        keys, values, counts, pivots, starts, sizes,
        out_k, out_v, out_c,
        s, d, dv,
        keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2),
        counts.stride(0), counts.stride(1),
        pivots.stride(0), pivots.stride(1),
        out_k.stride(0), out_k.stride(1), out_k.stride(2),
        out_v.stride(0), out_v.stride(1), out_v.stride(2),
        out_c.stride(0), out_c.stride(1),
        -1.0 / (2.0 * float(sigma) ** 2),
        SCALE_VALUES=value_mode == "scale", COUNT_WEIGHTED=bool(count_weighted),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_DV=block_dv,
    )
    return out_k, out_v, out_c
