"""kvcli_kernels: adjacent_cosine / merge_sets references (vs brute force) and Triton kernels."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import math

import pytest
import torch

from kvcli_kernels import adjacent_cosine, merge_sets, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton (or GPU/interpreter) unavailable")


# ----------------------------------------------------------------------------- helpers


def random_partition(n, length, s, gen):
    """set_ids [n, length] (contiguous runs 0..s-1, all present) and random pivots [n, s]."""
    set_ids = torch.zeros(n, length, dtype=torch.int64)
    pivots = torch.zeros(n, s, dtype=torch.int64)
    for r in range(n):
        cuts = sorted(torch.randperm(length - 1, generator=gen)[: s - 1].add(1).tolist()) if s > 1 else []
        bounds = [0] + cuts + [length]
        for sid in range(s):
            a, b = bounds[sid], bounds[sid + 1]
            set_ids[r, a:b] = sid
            pivots[r, sid] = a + int(torch.randint(0, b - a, (1,), generator=gen))
    return set_ids, pivots


def brute_cosine(keys):
    n, length, _ = keys.shape
    out = torch.zeros(n, max(length - 1, 0), dtype=torch.float64)
    for r in range(n):
        for i in range(length - 1):
            a, b = keys[r, i].double().tolist(), keys[r, i + 1].double().tolist()
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
            out[r, i] = 0.0 if na == 0 or nb == 0 else dot / (na * nb)
    return out


def brute_merge(keys, values, counts, set_ids, pivots, sigma, value_mode, count_weighted):
    n, _, d = keys.shape
    s = pivots.shape[1]
    mk = torch.zeros(n, s, d, dtype=torch.float64)
    mv = torch.zeros(n, s, values.shape[2], dtype=torch.float64)
    mc = torch.zeros(n, s, dtype=torch.float64)
    for r in range(n):
        for sid in range(s):
            members = [i for i in range(keys.shape[1]) if int(set_ids[r, i]) == sid]
            p = int(pivots[r, sid])
            assert p in members
            kp = keys[r, p].double()
            gs = []
            for i in members:
                g = math.exp(-float(((kp - keys[r, i].double()) ** 2).sum()) / (2 * sigma**2))
                if count_weighted:
                    g *= float(counts[r, i])
                gs.append(g)
            tot = sum(gs)
            for g, i in zip(gs, members, strict=True):
                mk[r, sid] += (g / tot) * keys[r, i].double()
                mv[r, sid] += (g / tot) * values[r, i].double()
                mc[r, sid] += float(counts[r, i])
            if value_mode == "scale":
                mv[r, sid] *= len(members)
    return mk, mv, mc


def make_merge_inputs(n, length, s, d, dv, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, length, d, generator=gen).to(dtype)
    # make neighbours similar so weights are not all ~0
    keys = (keys * 0.3 + torch.randn(n, 1, d, generator=gen)).to(dtype)
    values = torch.randn(n, length, dv, generator=gen).to(dtype)
    counts = torch.randint(1, 5, (n, length), generator=gen).float()
    set_ids, pivots = random_partition(n, length, s, gen)
    return keys, values, counts, set_ids, pivots


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("length", [0, 1, 2, 7, 33])
def test_kernel_ref_adjacent_cosine_matches_brute_force(length):
    keys = torch.randn(3, length, 16, generator=torch.Generator().manual_seed(length))
    if length > 3:
        keys[1, 2] = 0.0  # zero vector -> cosine 0 on both sides
    out = adjacent_cosine(keys)
    assert out.shape == (3, max(length - 1, 0)) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), brute_cosine(keys), atol=1e-5, rtol=1e-5)
    if length > 3:
        assert out[1, 1] == 0 and out[1, 2] == 0


@pytest.mark.parametrize("value_mode", ["scale", "bias"])
@pytest.mark.parametrize("count_weighted", [False, True])
def test_kernel_ref_merge_matches_brute_force(value_mode, count_weighted):
    keys, values, counts, set_ids, pivots = make_merge_inputs(3, 17, 6, 16, 8, seed=1)
    out = merge_sets(keys, values, counts, set_ids, pivots, 1.3, value_mode, count_weighted)
    exp = brute_merge(keys, values, counts, set_ids, pivots, 1.3, value_mode, count_weighted)
    for o, e in zip(out, exp, strict=True):
        torch.testing.assert_close(o.double(), e, atol=1e-5, rtol=1e-5)


def test_kernel_ref_merge_explicit_weights():
    # one row, one set {0,1,2}, pivot 1; keys chosen so the distances are known exactly
    keys = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]]])
    values = torch.tensor([[[1.0], [2.0], [4.0]]])
    counts = torch.tensor([[1.0, 2.0, 3.0]])
    set_ids = torch.zeros(1, 3, dtype=torch.int64)
    pivots = torch.tensor([[1]])
    sigma = 1.0
    g = torch.tensor([math.exp(-1 / 2), 1.0, math.exp(-4 / 2)], dtype=torch.float64)
    for cw in (False, True):
        gg = g * counts[0].double() if cw else g
        w = gg / gg.sum()
        mk, mv, mc = merge_sets(keys, values, counts, set_ids, pivots, sigma, "bias", cw)
        torch.testing.assert_close(mk[0, 0].double(), (w[:, None] * keys[0].double()).sum(0))
        torch.testing.assert_close(mv[0, 0, 0].double(), (w * values[0, :, 0].double()).sum())
        assert mc[0, 0] == 6.0
        _, mv_scaled, _ = merge_sets(keys, values, counts, set_ids, pivots, sigma, "scale", cw)
        torch.testing.assert_close(mv_scaled, mv * 3)


def test_kernel_ref_merge_singletons_pass_through():
    keys, values, counts, _, _ = make_merge_inputs(2, 5, 5, 16, 8, seed=2)
    set_ids = torch.arange(5).repeat(2, 1)
    for mode in ("scale", "bias"):
        mk, mv, mc = merge_sets(keys, values, counts, set_ids, set_ids.clone(), 0.7, mode, True)
        assert torch.equal(mk, keys) and torch.equal(mv, values) and torch.equal(mc, counts)


def test_kernel_ref_merge_empty():
    keys = torch.zeros(2, 0, 16)
    mk, mv, mc = merge_sets(
        keys,
        torch.zeros(2, 0, 8),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.long),
        1.0,
        "scale",
        False,
    )
    assert mk.shape == (2, 0, 16) and mv.shape == (2, 0, 8) and mc.shape == (2, 0)


def test_kernel_ref_merge_rejects_bad_mode():
    keys, values, counts, set_ids, pivots = make_merge_inputs(1, 4, 2, 16, 8)
    with pytest.raises(ValueError):
        merge_sets(keys, values, counts, set_ids, pivots, 1.0, "nope", False)


# ----------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.parametrize("length", [0, 1, 2, 7, 33])
@pytest.mark.parametrize("d", [16, 32])
def test_kernel_adjacent_cosine_triton(length, d):
    from kvcli_kernels.triton_merge import adjacent_cosine_triton

    keys = torch.randn(3, length, d, generator=torch.Generator().manual_seed(length + d))
    if length > 3:
        keys[0, 1] = 0.0
    out = adjacent_cosine_triton(keys)
    assert out.shape == (3, max(length - 1, 0)) and out.dtype == torch.float32
    torch.testing.assert_close(out, adjacent_cosine(keys), atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_adjacent_cosine_triton_strided_odd_dim():
    from kvcli_kernels.triton_merge import adjacent_cosine_triton

    base = torch.randn(9, 2, 24)  # [L, N, D] -> transpose gives a non-contiguous [N, L, D]
    keys = base.transpose(0, 1)
    torch.testing.assert_close(adjacent_cosine_triton(keys), adjacent_cosine(keys), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "n,length,s,d,dv",
    [(2, 1, 1, 16, 16), (3, 7, 3, 16, 32), (2, 33, 5, 32, 16), (1, 40, 2, 32, 32), (2, 6, 6, 16, 16)],
)
@pytest.mark.parametrize("value_mode", ["scale", "bias"])
@pytest.mark.parametrize("count_weighted", [False, True])
def test_kernel_merge_sets_triton(n, length, s, d, dv, value_mode, count_weighted):
    from kvcli_kernels.triton_merge import merge_sets_triton

    args = make_merge_inputs(n, length, s, d, dv, seed=length * 7 + s)
    out = merge_sets_triton(*args, 0.9, value_mode, count_weighted)
    ref = merge_sets(*args, 0.9, value_mode, count_weighted)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


@needs_triton
def test_kernel_merge_sets_triton_singletons_exact_and_empty():
    from kvcli_kernels.triton_merge import merge_sets_triton

    keys, values, counts, _, _ = make_merge_inputs(2, 5, 5, 16, 8, seed=3)
    ids = torch.arange(5).repeat(2, 1)
    mk, mv, mc = merge_sets_triton(keys, values, counts, ids, ids.clone(), 0.5, "scale", True)
    assert torch.equal(mk, keys) and torch.equal(mv, values) and torch.equal(mc, counts)

    empty = merge_sets_triton(
        torch.zeros(2, 0, 16),
        torch.zeros(2, 0, 8),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.long),
        1.0,
        "bias",
        False,
    )
    assert [t.shape for t in empty] == [(2, 0, 16), (2, 0, 8), (2, 0)]
