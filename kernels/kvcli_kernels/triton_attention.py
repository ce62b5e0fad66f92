"""Flash-attention-style Triton kernel with position masks, per-key bias and GQA.

Same signature and semantics as ``reference.attention``.  One program handles a block of
BLOCK_M "virtual rows" of one (batch, kv head): the G query heads sharing that kv head are
laid out as G*Lq rows (row r -> head kvh*G + r // Lq, query r % Lq), so every K/V block
loaded is used by the whole group and K/V are never expanded.  Keys are visited in blocks
with an online softmax; the Lq x Lk score matrix only ever exists per block, in registers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import TRITON_AVAILABLE, dot_precision, next_pow2, require_triton, tl, triton
from .reference import _check_attention_args

__all__ = ["TRITON_AVAILABLE", "attention_triton"]


if TRITON_AVAILABLE:

    @triton.jit
    def _attn_segment(
        acc, m_i, l_i,
        q, qpos, row_mask,
        k_base, v_base, pos_base, bias_base, L,
        s_kl, s_kd, s_vl, s_vd, s_pl, s_bl,
        scaling, window,
        D, DV,
        HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Fold keys [0, L) of one key set into the running (acc, m_i, l_i) state."""
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_d = offs_d < D
        mask_dv = offs_dv < DV
        for n0 in range(0, L, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < L
            kpos = tl.load(pos_base + offs_n * s_pl, mask=mask_n, other=0)
            allowed = mask_n[None, :] & row_mask[:, None] & (kpos[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                allowed = allowed & ((qpos[:, None] - kpos[None, :]) < window)
            n_allowed = tl.sum(tl.sum(allowed.to(tl.int32), axis=1), axis=0)
            if n_allowed > 0:  # skip blocks that are entirely masked (future / out of window)
                k = tl.load(
                    k_base + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0,
                )
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scaling
                if HAS_BIAS:
                    b = tl.load(bias_base + offs_n * s_bl, mask=mask_n, other=0.0).to(tl.float32)
                    s = s + b[None, :]
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m_i - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(
                    v_base + offs_n[:, None] * s_vl + offs_dv[None, :] * s_vd,
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0,
                )
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
                m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _load_query_block(
        q_ptr, qpos_ptr, pid_m, b, kvh,
        G, Lq, D,
        s_qb, s_qh, s_ql, s_qd, s_ppb, s_ppl,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Rows pid_m*BLOCK_M.. of the (G*Lq)-row grouped query of (b, kvh)."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = offs_m < G * Lq
        head = kvh * G + offs_m // Lq
        lq = offs_m % Lq
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(
            q_ptr + b * s_qb + head[:, None] * s_qh + lq[:, None] * s_ql + offs_d[None, :] * s_qd,
            mask=row_mask[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        qpos = tl.load(qpos_ptr + b * s_ppb + lq * s_ppl, mask=row_mask, other=0)
        return q, qpos, row_mask, head, lq

    @triton.jit
    def _store_output(
        o_ptr, acc, l_i, row_mask, head, lq, b, DV,
        s_ob, s_oh, s_ol, s_od,
        BLOCK_DV: tl.constexpr,
    ):
        offs_dv = tl.arange(0, BLOCK_DV)
        safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = tl.where(l_i[:, None] > 0.0, acc / safe[:, None], 0.0)
        tl.store(
            o_ptr + b * s_ob + head[:, None] * s_oh + lq[:, None] * s_ol + offs_dv[None, :] * s_od,
            out.to(o_ptr.dtype.element_ty),
            mask=row_mask[:, None] & (offs_dv[None, :] < DV),
        )

    @triton.jit
    def _attention_kernel(
        q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, bias_ptr, o_ptr,
        Hkv, G, Lq, Lk, D, DV,
        s_qb, s_qh, s_ql, s_qd,
        s_kb, s_kh, s_kl, s_kd,
        s_vb, s_vh, s_vl, s_vd,
        s_ppb, s_ppl,
        s_kpb, s_kph, s_kpl,
        s_bb, s_bh, s_bl,
        s_ob, s_oh, s_ol, s_od,
        scaling, window,
        HAS_BIAS: tl.constexpr, HAS_WINDOW: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // Hkv
        kvh = bh % Hkv
        q, qpos, row_mask, head, lq = _load_query_block(
            q_ptr, qpos_ptr, pid_m, b, kvh, G, Lq, D,
            s_qb, s_qh, s_ql, s_qd, s_ppb, s_ppl, BLOCK_M, BLOCK_D,
        )
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, qpos, row_mask,
            k_ptr + b * s_kb + kvh * s_kh, v_ptr + b * s_vb + kvh * s_vh,
            kpos_ptr + b * s_kpb + kvh * s_kph, bias_ptr + b * s_bb + kvh * s_bh, Lk,
            s_kl, s_kd, s_vl, s_vd, s_kpl, s_bl,
            scaling, window, D, DV,
            HAS_BIAS, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PREC,
        )
        _store_output(o_ptr, acc, l_i, row_mask, head, lq, b, DV, s_ob, s_oh, s_ol, s_od, BLOCK_DV)


def pick_blocks(rows: int, keys: int, d: int, dv: int) -> tuple[int, int, int, int]:
    """Block sizes: >= 16 everywhere (tl.dot minimum), capped to keep registers sane."""
    block_m = min(next_pow2(rows, 16), 64)
    block_n = min(next_pow2(keys, 16), 64)
    return block_m, block_n, next_pow2(d, 16), next_pow2(dv, 16)


def check_same_dtype(*tensors: Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise ValueError(f"q, k and v must share one dtype, got {sorted(map(str, dtypes))}")
    dt = next(iter(dtypes))
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {dt} (use float16, bfloat16 or float32)")


def window_args(sliding_window: int | None) -> tuple[bool, int]:
    if sliding_window is None:
        return False, 0
    return True, int(sliding_window)


def attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    bias: Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
) -> Tensor:
    """Triton version of ``reference.attention`` (see its docstring for the semantics)."""
    require_triton(q, k, v, q_pos, k_pos, bias)
    _check_attention_args(q, k, v, q_pos, k_pos, bias)
    check_same_dtype(q, k, v)
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    out = torch.zeros(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    if b == 0 or lq == 0 or lk == 0:
        return out
    q_pos = q_pos.long()
    k_pos = k_pos.long()
    has_bias = bias is not None
    bias_t = bias if has_bias else k_pos  # dummy pointer, never read
    bias_strides = (bias_t.stride(0), bias_t.stride(1), bias_t.stride(2)) if has_bias else (0, 0, 0)
    has_window, window = window_args(sliding_window)
    block_m, block_n, block_d, block_dv = pick_blocks(g * lq, lk, d, dv)
    grid = (triton.cdiv(g * lq, block_m), b * hkv)
    _attention_kernel[grid](
        q, k, v, q_pos, k_pos, bias_t, out,
        hkv, g, lq, lk, d, dv,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        q_pos.stride(0), q_pos.stride(1),
        k_pos.stride(0), k_pos.stride(1), k_pos.stride(2),
        *bias_strides,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        float(scaling), window,
        HAS_BIAS=has_bias, HAS_WINDOW=has_window,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DOT_PREC=dot_precision(q.dtype),
    )
    return out
