"""kvcli's torch reference attention (``kvcli.attention.reference.attend``) against an eager
float64 softmax: per-head key positions (a compressed cache), a log-count bias (merged
entries), grouped queries, sliding windows.  It builds one mask for all KV heads when their
positions differ only at keys every query sees, and folds the bias into the dot product."""

from __future__ import annotations

import math

import pytest
import torch

from kvcli.attention.reference import attend, mask_positions


def eager(q, k, v, q_pos, k_pos, bias, scaling, window):
    b, hq, lq, _ = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    logits = torch.matmul(q.double(), kk.transpose(-1, -2)) * scaling
    if bias is not None:
        logits = logits + bias.double().repeat_interleave(g, dim=1).unsqueeze(2)
    kp = k_pos.expand(b, hkv, -1).repeat_interleave(g, dim=1).unsqueeze(2)  # [B, Hq, 1, Lk]
    qp = q_pos.view(1, 1, -1, 1)
    ok = kp <= qp
    if window is not None:
        ok = ok & (qp - kp < window)
    logits = logits.masked_fill(~ok, -math.inf)
    return torch.matmul(torch.softmax(logits, dim=-1), vv)


def compressed_positions(gen, hkv, n_ctx, start, lq, after=False):
    """Per-head positions of ``n_ctx`` kept entries out of ``start`` earlier tokens, then the
    chunk's own ``lq`` (the same in every head).  ``after``: one head also holds an entry
    at a position inside the chunk's range (keys a query may not see)."""
    rows = []
    for _ in range(hkv):
        ctx = torch.randperm(start, generator=gen)[:n_ctx].sort().values
        rows.append(torch.cat([ctx, torch.arange(start, start + lq)]))
    k_pos = torch.stack(rows).unsqueeze(0)
    if after:
        k_pos[0, 0, n_ctx - 1] = start + lq // 2
    return k_pos


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("hq,hkv", [(6, 3), (4, 1), (2, 2)])
def test_attend_matches_eager_softmax(with_bias, after, hq, hkv):
    gen = torch.Generator().manual_seed(hq * 7 + hkv + 2 * with_bias + after)
    n_ctx, start, lq, d = 20, 40, 6, 8
    q = torch.randn(1, hq, lq, d, generator=gen)
    k = torch.randn(1, hkv, n_ctx + lq, d, generator=gen)
    v = torch.randn(1, hkv, n_ctx + lq, d, generator=gen)
    q_pos = torch.arange(start, start + lq)
    k_pos = compressed_positions(gen, hkv, n_ctx, start, lq, after)
    bias = torch.log(torch.randint(1, 5, (1, hkv, n_ctx + lq), generator=gen).float()) if with_bias else None
    out = attend(q, k, v, q_pos, k_pos, bias, 0.3, None)
    torch.testing.assert_close(out.double(), eager(q, k, v, q_pos, k_pos, bias, 0.3, None), atol=1e-5, rtol=1e-5)
    assert out.shape == (1, hq, lq, d)


def test_mask_is_shared_only_where_every_query_sees_the_differing_keys():
    gen = torch.Generator().manual_seed(0)
    q_pos = torch.arange(40, 46)
    k_pos = compressed_positions(gen, 3, 20, 40, 6)
    assert not torch.equal(k_pos[:, 0], k_pos[:, 1])  # the heads keep different entries
    assert mask_positions(q_pos, k_pos, None).shape == (1, 1, 26)  # one mask for all heads
    assert mask_positions(q_pos, k_pos, window=8).shape == (1, 3, 26)  # a window hides old keys per head
    hidden = compressed_positions(gen, 3, 20, 40, 6, after=True)
    assert mask_positions(q_pos, hidden, None).shape == (1, 3, 26)


@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_with_a_window_and_per_head_positions(with_bias):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 5, 8, generator=gen)
    k = torch.randn(1, 2, 25, 8, generator=gen)
    v = torch.randn(1, 2, 25, 8, generator=gen)
    q_pos = torch.arange(30, 35)
    k_pos = compressed_positions(gen, 2, 20, 30, 5)
    bias = torch.log(torch.randint(1, 5, (1, 2, 25), generator=gen).float()) if with_bias else None
    out = attend(q, k, v, q_pos, k_pos, bias, 0.3, 12)
    torch.testing.assert_close(out.double(), eager(q, k, v, q_pos, k_pos, bias, 0.3, 12), atol=1e-5, rtol=1e-5)


def test_bias_in_low_precision_stays_close():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 6, 4, 16, generator=gen)
    k = torch.randn(1, 3, 30, 16, generator=gen)
    v = torch.randn(1, 3, 30, 16, generator=gen)
    q_pos = torch.arange(60, 64)
    k_pos = compressed_positions(gen, 3, 26, 60, 4)
    bias = torch.log(torch.randint(1, 9, (1, 3, 30), generator=gen).float())
    out = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), q_pos, k_pos, bias, 0.25, None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), eager(q, k, v, q_pos, k_pos, bias, 0.25, None), atol=3e-2, rtol=3e-2)
