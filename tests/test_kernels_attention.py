"""kvcli_kernels: masked GQA attention reference (vs brute force / SDPA) and Triton kernel."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import math

import pytest
import torch
import torch.nn.functional as F

from kvcli_kernels import attention, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton (or GPU/interpreter) unavailable")


def brute_attention(q, k, v, q_pos, k_pos, bias, scaling, window):
    """Loop over (batch, head, query); float64."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    grp = hq // hkv
    out = torch.zeros(b, hq, lq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // grp
            for i in range(lq):
                logits, vals = [], []
                for j in range(lk):
                    qp, kp = int(q_pos[bi, i]), int(k_pos[bi, kh, j])
                    if kp > qp or (window is not None and qp - kp >= window):
                        continue
                    x = scaling * float((q[bi, h, i].double() * k[bi, kh, j].double()).sum())
                    if bias is not None:
                        x += float(bias[bi, kh, j])
                    logits.append(x)
                    vals.append(v[bi, kh, j].double())
                if not logits:
                    continue
                m = max(logits)
                ws = [math.exp(x - m) for x in logits]
                tot = sum(ws)
                out[bi, h, i] = sum(w / tot * vv for w, vv in zip(ws, vals, strict=True))
    return out


def make_inputs(b, hq, hkv, lq, lk, d, dv, with_bias, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=gen).to(dtype)
    # arbitrary (compressed-cache-like) key positions, per kv head; queries after most of them
    k_pos = (
        torch.stack(
            [
                torch.stack([torch.randperm(lk + 5, generator=gen)[:lk].sort().values for _ in range(hkv)])
                for _ in range(b)
            ]
        )
        if lk
        else torch.zeros(b, hkv, 0, dtype=torch.long)
    )
    q_pos = torch.randint(0, lk + 8, (b, lq), generator=gen)
    bias = torch.log(torch.randint(1, 6, (b, hkv, lk), generator=gen).float()) if with_bias else None
    return q, k, v, q_pos, k_pos, bias


CASES = [
    # b, hq, hkv, lq, lk, d, dv
    (1, 1, 1, 1, 1, 16, 16),
    (2, 4, 2, 3, 7, 16, 16),  # GQA
    (1, 4, 1, 5, 33, 32, 16),  # MQA
    (2, 2, 2, 9, 70, 32, 32),  # several key blocks
]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("window", [None, 4])
def test_kernel_ref_attention_matches_brute_force(case, with_bias, window):
    q, k, v, q_pos, k_pos, bias = make_inputs(*case, with_bias, seed=sum(case))
    out = attention(q, k, v, q_pos, k_pos, bias, 0.25, window)
    exp = brute_attention(q, k, v, q_pos, k_pos, bias, 0.25, window)
    torch.testing.assert_close(out.double(), exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (3, 3)])
def test_kernel_ref_attention_equals_sdpa_causal(hq, hkv):
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    b, length, d = 2, 11, 16
    q = torch.randn(b, hq, length, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    pos = torch.arange(length).repeat(b, 1)
    out = attention(q, k, v, pos, pos.unsqueeze(1).expand(b, hkv, length), None, d**-0.5, None)
    rep = hq // hkv
    exp = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True
    )
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)


def test_kernel_ref_attention_no_allowed_entry_gives_zeros():
    q, k, v, q_pos, k_pos, bias = make_inputs(1, 2, 1, 3, 5, 16, 16, True, seed=4)
    k_pos = torch.full_like(k_pos, 10)
    q_pos = torch.tensor([[3, 10, 20]])
    out = attention(q, k, v, q_pos, k_pos, bias, 0.3, 5)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))  # all keys in the future
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))  # all keys out of window
    assert out[:, :, 1].abs().sum() > 0
    assert torch.isfinite(out).all()


def test_kernel_ref_attention_empty_keys_and_dtype():
    q, k, v, q_pos, k_pos, _ = make_inputs(1, 2, 2, 3, 0, 16, 8, False)
    out = attention(q, k, v, q_pos, k_pos, None, 1.0)
    assert out.shape == (1, 2, 3, 8) and torch.equal(out, torch.zeros_like(out))
    q, k, v, q_pos, k_pos, _ = make_inputs(1, 2, 2, 3, 4, 16, 8, False, dtype=torch.bfloat16)
    assert attention(q, k, v, q_pos, k_pos, None, 1.0).dtype == torch.bfloat16


def test_kernel_ref_attention_rejects_bad_heads():
    q, k, v, q_pos, k_pos, _ = make_inputs(1, 3, 2, 2, 4, 16, 16, False)
    with pytest.raises(ValueError):
        attention(q, k, v, q_pos, k_pos, None, 1.0)


# ----------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_attention_triton(case, with_bias, window):
    from kvcli_kernels.triton_attention import attention_triton

    q, k, v, q_pos, k_pos, bias = make_inputs(*case, with_bias, seed=sum(case) + 1)
    out = attention_triton(q, k, v, q_pos, k_pos, bias, 0.3, window)
    ref = attention(q, k, v, q_pos, k_pos, bias, 0.3, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernel_attention_triton_causal_sdpa_and_strided():
    from kvcli_kernels.triton_attention import attention_triton

    gen = torch.Generator().manual_seed(7)
    b, hq, hkv, length, d = 1, 4, 2, 13, 32
    # HF layout [B, L, H, D] transposed -> non-contiguous inputs
    q = torch.randn(b, length, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, length, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(b, length, hkv, d, generator=gen).transpose(1, 2)
    pos = torch.arange(length).repeat(b, 1)
    out = attention_triton(q, k, v, pos, pos.unsqueeze(1).expand(b, hkv, length), None, d**-0.5)
    exp = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernel_attention_triton_no_allowed_and_empty():
    from kvcli_kernels.triton_attention import attention_triton

    q, k, v, q_pos, k_pos, bias = make_inputs(1, 4, 2, 3, 7, 16, 16, True, seed=5)
    k_pos = torch.full_like(k_pos, 10)
    q_pos = torch.tensor([[3, 10, 20]])
    out = attention_triton(q, k, v, q_pos, k_pos, bias, 0.3, 5)
    torch.testing.assert_close(out, attention(q, k, v, q_pos, k_pos, bias, 0.3, 5), atol=1e-4, rtol=1e-4)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))

    q, k, v, q_pos, k_pos, _ = make_inputs(1, 2, 1, 3, 0, 16, 16, False)
    out = attention_triton(q, k, v, q_pos, k_pos, None, 1.0)
    assert out.shape == (1, 2, 3, 16) and torch.equal(out, torch.zeros_like(out))


@needs_triton
def test_kernel_attention_triton_fp16():
    from kvcli_kernels.triton_attention import attention_triton

    q, k, v, q_pos, k_pos, bias = make_inputs(1, 4, 2, 3, 20, 16, 16, True, seed=6, dtype=torch.float16)
    out = attention_triton(q, k, v, q_pos, k_pos, bias, 0.25, None)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, attention(q, k, v, q_pos, k_pos, bias, 0.25, None), atol=2e-2, rtol=2e-2)


@needs_triton
def test_kernel_attention_triton_rejects_mixed_dtypes():
    from kvcli_kernels.triton_attention import attention_triton

    q, k, v, q_pos, k_pos, _ = make_inputs(1, 2, 1, 2, 4, 16, 16, False)
    with pytest.raises(ValueError):
        attention_triton(q, k.half(), v, q_pos, k_pos, None, 1.0)
