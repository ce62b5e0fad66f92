"""kvcli_kernels: PoD attention (one softmax over distant + proximal keys), reference and Triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import math

import pytest
import torch

from kvcli_kernels import attention, pod_attention, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton (or GPU/interpreter) unavailable")


def make_pod_inputs(b, hq, hkv, lq, lp, ld, d, dv, bias_prox, bias_dist, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen)
    k_dist = torch.randn(b, hkv, ld, d, generator=gen)
    v_dist = torch.randn(b, hkv, ld, dv, generator=gen)
    pos_dist = torch.randint(0, 30, (b, hkv, ld), generator=gen)  # old, shared-layer entries
    k_prox = torch.randn(b, hkv, lp, d, generator=gen)
    v_prox = torch.randn(b, hkv, lp, dv, generator=gen)
    pos_prox = torch.randint(30, 30 + max(lp, 1) + 2, (b, hkv, lp), generator=gen)  # recent entries
    q_pos = torch.randint(20, 30 + lp + 4, (b, lq), generator=gen)
    b_p = torch.log(torch.randint(1, 4, (b, hkv, lp), generator=gen).float()) if bias_prox else None
    b_d = torch.log(torch.randint(1, 4, (b, hkv, ld), generator=gen).float()) if bias_dist else None
    return dict(
        q=q,
        k_prox=k_prox,
        v_prox=v_prox,
        pos_prox=pos_prox,
        k_dist=k_dist,
        v_dist=v_dist,
        pos_dist=pos_dist,
        bias_prox=b_p,
        bias_dist=b_d,
        q_pos=q_pos,
    )


def concat_attention(a, scaling, window):
    k = torch.cat([a["k_dist"], a["k_prox"]], 2)
    v = torch.cat([a["v_dist"], a["v_prox"]], 2)
    pos = torch.cat([a["pos_dist"], a["pos_prox"]], 2)
    if a["bias_prox"] is None and a["bias_dist"] is None:
        bias = None
    else:
        zp = torch.zeros(a["pos_prox"].shape)
        zd = torch.zeros(a["pos_dist"].shape)
        bias = torch.cat(
            [
                a["bias_dist"] if a["bias_dist"] is not None else zd,
                a["bias_prox"] if a["bias_prox"] is not None else zp,
            ],
            2,
        )
    return attention(a["q"], k, v, a["q_pos"], pos, bias, scaling, window)


def brute_pod(a, scaling, window):
    """Loop over every query: one softmax over the distant and proximal entries together."""
    q = a["q"]
    b, hq, lq, _ = q.shape
    hkv = a["k_prox"].shape[1]
    dv = a["v_prox"].shape[3]
    out = torch.zeros(b, hq, lq, dv, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(lq):
                qp = int(a["q_pos"][bi, i])
                terms = []
                for part in ("dist", "prox"):
                    bias = a[f"bias_{part}"]
                    for j in range(a[f"k_{part}"].shape[2]):
                        kp = int(a[f"pos_{part}"][bi, kh, j])
                        if kp > qp or (window is not None and qp - kp >= window):
                            continue
                        x = scaling * float((q[bi, h, i].double() * a[f"k_{part}"][bi, kh, j].double()).sum())
                        x += float(bias[bi, kh, j]) if bias is not None else 0.0
                        terms.append((x, a[f"v_{part}"][bi, kh, j].double()))
                if terms:
                    m = max(x for x, _ in terms)
                    tot = sum(math.exp(x - m) for x, _ in terms)
                    out[bi, h, i] = sum(math.exp(x - m) / tot * vv for x, vv in terms)
    return out


CASES = [
    # b, hq, hkv, lq, lp, ld, d, dv
    (1, 1, 1, 1, 1, 1, 16, 16),
    (2, 4, 2, 3, 7, 33, 16, 16),  # GQA
    (1, 4, 1, 4, 9, 0, 32, 16),  # MQA, no distant entries
    (1, 4, 2, 2, 0, 12, 16, 32),  # no proximal entries
    (1, 2, 2, 5, 70, 40, 32, 32),  # several blocks in both sets
]
BIASES = [(False, False), (True, True), (True, False)]


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("biases", BIASES)
@pytest.mark.parametrize("window", [None, 6])
def test_kernel_ref_pod_equals_attention_on_concatenation(case, biases, window):
    a = make_pod_inputs(*case, *biases, seed=sum(case))
    out = pod_attention(**a, scaling=0.2, sliding_window=window)
    torch.testing.assert_close(out, concat_attention(a, 0.2, window), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES[:4])
def test_kernel_ref_pod_matches_brute_force(case):
    a = make_pod_inputs(*case, True, True, seed=sum(case) + 3)
    out = pod_attention(**a, scaling=0.2, sliding_window=8)
    torch.testing.assert_close(out.double(), brute_pod(a, 0.2, 8), atol=1e-5, rtol=1e-5)


def test_kernel_ref_pod_all_empty_gives_zeros():
    a = make_pod_inputs(1, 2, 1, 3, 0, 0, 16, 16, True, True)
    out = pod_attention(**a, scaling=1.0)
    assert out.shape == (1, 2, 3, 16) and torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("biases", BIASES)
@pytest.mark.parametrize("window", [None, 6])
def test_kernel_pod_attention_triton(case, biases, window):
    from kvcli_kernels.triton_pod import pod_attention_triton

    a = make_pod_inputs(*case, *biases, seed=sum(case) + 11)
    out = pod_attention_triton(**a, scaling=0.2, sliding_window=window)
    ref = pod_attention(**a, scaling=0.2, sliding_window=window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernel_pod_attention_triton_no_allowed_and_empty():
    from kvcli_kernels.triton_pod import pod_attention_triton

    a = make_pod_inputs(1, 4, 2, 3, 5, 6, 16, 16, True, False, seed=2)
    a["pos_dist"] = torch.full_like(a["pos_dist"], 10)
    a["pos_prox"] = torch.full_like(a["pos_prox"], 12)
    a["q_pos"] = torch.tensor([[5, 12, 40]])  # before everything / sees all / outside the window
    out = pod_attention_triton(**a, scaling=0.5, sliding_window=10)
    torch.testing.assert_close(out, pod_attention(**a, scaling=0.5, sliding_window=10), atol=1e-4, rtol=1e-4)
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert out[:, :, 1].abs().sum() > 0

    e = make_pod_inputs(1, 2, 1, 3, 0, 0, 16, 16, False, False)
    out = pod_attention_triton(**e, scaling=1.0)
    assert out.shape == (1, 2, 3, 16) and torch.equal(out, torch.zeros_like(out))
