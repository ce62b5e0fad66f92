"""Triton kernel for PoD attention: one online softmax over distant and proximal keys.

Same signature and semantics as ``reference.pod_attention``.  The distant keys (shared
from another layer) are read from ``k_dist``/``v_dist`` and the proximal ones from
``k_prox``/``v_prox`` inside one program, folding both into the same running softmax
state; the two sets are never concatenated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import TRITON_AVAILABLE, dot_precision, require_triton, tl, triton
from .reference import _check_attention_args
from .triton_attention import check_same_dtype, pick_blocks, window_args

if TRITON_AVAILABLE:
    from .triton_attention import _attn_segment, _load_query_block, _store_output

__all__ = ["TRITON_AVAILABLE", "pod_attention_triton"]


if TRITON_AVAILABLE:

    @triton.jit
    def _pod_attention_kernel(
        q_ptr, qpos_ptr, o_ptr,
        kd_ptr, vd_ptr, pd_ptr, bd_ptr,
        kp_ptr, vp_ptr, pp_ptr, bp_ptr,
        Hkv, G, Lq, Ld, Lp, D, DV,
        s_qb, s_qh, s_ql, s_qd,
        s_ppb, s_ppl,
        s_ob, s_oh, s_ol, s_od,
        s_kdb, s_kdh, s_kdl, s_kdd,
        s_vdb, s_vdh, s_vdl, s_vdd,
        s_pdb, s_pdh, s_pdl,
        s_bdb, s_bdh, s_bdl,
        s_kpb, s_kph, s_kpl, s_kpd,
        s_vpb, s_vph, s_vpl, s_vpd,
        s_ppb2, s_pph, s_ppl2,
        s_bpb, s_bph, s_bpl,
        scaling, window,
        BIAS_DIST: tl.constexpr, BIAS_PROX: tl.constexpr, HAS_WINDOW: tl.constexpr,
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
        # Distant keys (from the sharing layer) ...
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, qpos, row_mask,
            kd_ptr + b * s_kdb + kvh * s_kdh, vd_ptr + b * s_vdb + kvh * s_vdh,
            pd_ptr + b * s_pdb + kvh * s_pdh, bd_ptr + b * s_bdb + kvh * s_bdh, Ld,
            s_kdl, s_kdd, s_vdl, s_vdd, s_pdl, s_bdl,
            scaling, window, D, DV,
            BIAS_DIST, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PREC,
        )
        # ... then proximal keys, continuing the same online softmax.
        acc, m_i, l_i = _attn_segment(
            acc, m_i, l_i, q, qpos, row_mask,
            kp_ptr + b * s_kpb + kvh * s_kph, vp_ptr + b * s_vpb + kvh * s_vph,
            pp_ptr + b * s_ppb2 + kvh * s_pph, bp_ptr + b * s_bpb + kvh * s_bph, Lp,
            s_kpl, s_kpd, s_vpl, s_vpd, s_ppl2, s_bpl,
            scaling, window, D, DV,
            BIAS_PROX, HAS_WINDOW, BLOCK_N, BLOCK_D, BLOCK_DV, DOT_PREC,
        )
        _store_output(o_ptr, acc, l_i, row_mask, head, lq, b, DV, s_ob, s_oh, s_ol, s_od, BLOCK_DV)


def _bias_arg(bias: Tensor | None, dummy: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    if bias is None:
        return dummy, (0, 0, 0)
    return bias, (bias.stride(0), bias.stride(1), bias.stride(2))


def pod_attention_triton(
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
    """Triton version of ``reference.pod_attention`` (no concatenation of the key sets).

    A missing bias for one set counts as zeros for that set.
    """
    require_triton(q, k_prox, v_prox, pos_prox, k_dist, v_dist, pos_dist, bias_prox, bias_dist, q_pos)
    _check_attention_args(q, k_prox, v_prox, q_pos, pos_prox, bias_prox)
    _check_attention_args(q, k_dist, v_dist, q_pos, pos_dist, bias_dist)
    if v_prox.shape[3] != v_dist.shape[3]:
        raise ValueError("v_prox and v_dist must have the same head dim")
    check_same_dtype(q, k_prox, v_prox, k_dist, v_dist)
    b, hq, lq, d = q.shape
    hkv, lp, dv = k_prox.shape[1], k_prox.shape[2], v_prox.shape[3]
    ld = k_dist.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    if b == 0 or lq == 0 or lp + ld == 0:
        return out
    q_pos = q_pos.long()
    pos_prox = pos_prox.long()
    pos_dist = pos_dist.long()
    bd, bd_strides = _bias_arg(bias_dist, pos_dist)
    bp, bp_strides = _bias_arg(bias_prox, pos_prox)
    has_window, window = window_args(sliding_window)
    block_m, block_n, block_d, block_dv = pick_blocks(g * lq, max(lp, ld), d, dv)
    grid = (triton.cdiv(g * lq, block_m), b * hkv)
    _pod_attention_kernel[grid](
        q, q_pos, out,
        k_dist, v_dist, pos_dist, bd,
        k_prox, v_prox, pos_prox, bp,
        hkv, g, lq, ld, lp, d, dv,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        q_pos.stride(0), q_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        k_dist.stride(0), k_dist.stride(1), k_dist.stride(2), k_dist.stride(3),
        v_dist.stride(0), v_dist.stride(1), v_dist.stride(2), v_dist.stride(3),
        pos_dist.stride(0), pos_dist.stride(1), pos_dist.stride(2),
        *bd_strides,
        k_prox.stride(0), k_prox.stride(1), k_prox.stride(2), k_prox.stride(3),
        v_prox.stride(0), v_prox.stride(1), v_prox.stride(2), v_prox.stride(3),
        pos_prox.stride(0), pos_prox.stride(1), pos_prox.stride(2),
        *bp_strides,
        float(scaling), window,
        BIAS_DIST=bias_dist is not None, BIAS_PROX=bias_prox is not None, HAS_WINDOW=has_window,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        DOT_PREC=dot_precision(q.dtype),
    )
    return out
