"""Which attention / compression kernels run where (``kvcli.backends``), and when flash-attn
computes exactly what kvcli's attention computes (``kvcli.flash.flash_plan``).

Machine capabilities (CUDA, triton, flash-attn, the Triton interpreter) are monkeypatched,
so every rule is checked on a CPU-only machine.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from kvcli.attention import backends, flash
from kvcli.attention.reference import allowed_mask, attend
from kvcli.cli.options import error_line
from kvcli.core.errors import KvcliError

# ---------------------------------------------------------------------------------------- helpers


@pytest.fixture
def machine(monkeypatch):
    """Set what this 'machine' has: machine(cuda=..., triton=..., flash=..., interpret=...)."""

    def set_(cuda=False, triton=False, flash=None, interpret=False):
        monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
        monkeypatch.setattr(backends, "triton_importable", lambda: triton)
        reason = None if flash is True else (flash or "flash-attn is not installed (pip install 'kvcli[gpu]')")
        monkeypatch.setattr(backends, "flash_unavailable_reason", lambda: reason)
        monkeypatch.setattr(backends, "interpret_mode", lambda: interpret)

    return set_


def one_line_error(name, device="auto", *needles):
    """The line the command line prints (the library names ``backend``; the CLI says ``--attn``)."""
    with pytest.raises(KvcliError) as info:
        backends.resolve_backend(name, device)
    text = error_line(info.value)
    assert text and "\n" not in text, text
    for needle in needles:
        assert needle.lower() in text.lower(), text
    return text


# ----------------------------------------------------------------------------------- auto


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("has_flash", [False, True])
@pytest.mark.parametrize("interpret", [False, True])
def test_kernel_dispatch_auto_on_cpu_is_sdpa(machine, triton, has_flash, interpret):
    machine(cuda=False, triton=triton, flash=has_flash or None, interpret=interpret)
    assert backends.resolve_backend("auto", "auto") == "sdpa"
    assert backends.resolve_backend("auto", "cpu") == "sdpa"


@pytest.mark.parametrize(
    "triton, has_flash, expected",
    [
        (True, True, "flash"),  # flash where it is exact, the Triton kernel for the rest
        (False, True, "flash"),  # flash where exact, sdpa for the rest
        (True, False, "triton"),
        (False, False, "sdpa"),
    ],
)
def test_kernel_dispatch_auto_on_cuda(machine, triton, has_flash, expected):
    machine(cuda=True, triton=triton, flash=has_flash or None)
    assert backends.resolve_backend("auto", "auto") == expected
    assert backends.resolve_backend("auto", "cuda") == expected
    assert backends.resolve_backend("auto", "cpu") == "sdpa"  # --device cpu on a CUDA machine


def test_kernel_dispatch_sdpa_always(machine):
    for cuda in (False, True):
        machine(cuda=cuda, triton=True, flash=True)
        assert backends.resolve_backend("sdpa", "auto") == "sdpa"


def test_kernel_dispatch_unknown_name(machine):
    machine()
    one_line_error("magic", "auto", "magic", "auto", "sdpa", "flash", "triton")


# --------------------------------------------------------------------------------- explicit


def test_kernel_dispatch_triton_explicit(machine):
    machine(cuda=True, triton=True)
    assert backends.resolve_backend("triton", "auto") == "triton"
    machine(cuda=False, triton=True)
    one_line_error("triton", "auto", "--attn triton", "cuda", "sdpa")
    machine(cuda=True, triton=True)
    one_line_error("triton", "cpu", "--attn triton", "device is cpu")
    machine(cuda=True, triton=False)
    one_line_error("triton", "auto", "triton", "not installed")


def test_kernel_dispatch_triton_interpreter_allows_cpu(machine):
    machine(cuda=False, triton=True, interpret=True)
    assert backends.resolve_backend("triton", "auto") == "triton"
    assert backends.resolve_backend("triton", "cpu") == "triton"
    machine(cuda=False, triton=False, interpret=True)
    one_line_error("triton", "auto", "not installed")


def test_kernel_dispatch_flash_explicit(machine):
    machine(cuda=True, flash=True)
    assert backends.resolve_backend("flash", "auto") == "flash"
    machine(cuda=False, flash=True)
    one_line_error("flash", "auto", "--attn flash", "cuda")
    machine(cuda=True, flash=True, triton=True, interpret=True)
    one_line_error("flash", "cpu", "--attn flash", "device is cpu")
    machine(cuda=True, flash=None)
    one_line_error("flash", "auto", "--attn flash", "not installed")
    machine(cuda=True, flash="flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0); this one is 7.5")
    one_line_error("flash", "auto", "ampere", "7.5")


def test_kernel_dispatch_flash_reason_on_old_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    why = flash.flash_unavailable_reason()
    assert "7.5" in why and "\n" not in why
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" in flash.flash_unavailable_reason().lower()


def test_kernel_dispatch_real_machine_flash_error_is_one_line():
    """On this machine (no flash-attn; no CUDA in CI) --attn flash is a clear error."""
    if backends.flash_unavailable_reason() is None and torch.cuda.is_available():
        pytest.skip("flash-attn can run here")
    one_line_error("flash", "auto", "flash")


def test_kernel_dispatch_cli_attn_flash_one_line(capfd, monkeypatch, tmp_path):
    if backends.flash_unavailable_reason() is None and torch.cuda.is_available():
        pytest.skip("flash-attn can run here")
    from test_cli import assert_one_line_error, run_cli

    doc = tmp_path / "doc.txt"
    doc.write_text("The keeper is Alma.\n", encoding="utf-8")
    assert_one_line_error(run_cli(["ask", doc, "q", "--attn", "flash"], capfd, monkeypatch), "flash")


# ------------------------------------------------------------------------------ callables


def test_kernel_dispatch_get_backend():
    assert backends.get_backend("sdpa") is attend
    assert backends.get_backend("triton") is backends.triton_attend
    assert backends.get_backend("flash") is backends._flash_with_fallback
    with pytest.raises(ValueError):
        backends.get_backend("auto")
    assert backends.uses_pod_kernel("triton")
    assert not backends.uses_pod_kernel("sdpa") and not backends.uses_pod_kernel("flash")


def test_kernel_dispatch_engine_resolves_and_splits_pod_keys(machine):
    from kvcli.cache import SharedKeyLayer
    from kvcli.core.budget import Budget
    from kvcli.engine.engine import Engine
    from kvcli.methods import make_method

    from conftest import tiny_llama

    model = tiny_llama(layers=2)
    machine(cuda=False, triton=True, interpret=True)
    eng = Engine(model, make_method("pod"), Budget(ratio=1.0), backend="auto")
    assert eng.state.backend == "sdpa"
    assert not any(getattr(layer, "split_keys", False) for layer in eng.cache.layers)
    eng = Engine(model, make_method("pod"), Budget(ratio=1.0), backend="triton")
    members = [layer for layer in eng.cache.layers if isinstance(layer, SharedKeyLayer)]
    assert members and all(layer.split_keys for layer in members)
    machine(cuda=False, triton=True, interpret=False)
    with pytest.raises(KvcliError):
        Engine(model, make_method("full"), Budget(ratio=1.0), backend="triton")


def test_kernel_dispatch_merge_follows_active_backend(monkeypatch):
    """KVMerger's merge: the Triton kernel under triton/flash where triton runs on the
    tensors' device (CUDA, or the interpreter), the torch reference otherwise."""
    import kvcli_kernels
    import kvcli_kernels.reference as reference

    calls = []
    fake_triton = type(sys)("kvcli_kernels.triton_merge")
    fake_triton.merge_sets_triton = lambda *a: calls.append("triton") or reference.merge_sets(*a)
    fake_triton.adjacent_cosine_triton = lambda k: calls.append("cos") or reference.adjacent_cosine(k)
    monkeypatch.setitem(sys.modules, "kvcli_kernels.triton_merge", fake_triton)
    monkeypatch.setattr(kvcli_kernels, "merge_sets", lambda *a: calls.append("ref") or reference.merge_sets(*a))

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    counts = torch.ones(2, 6)
    set_ids = torch.tensor([[0, 0, 1, 1, 1, 2]] * 2)
    pivots = torch.tensor([[0, 3, 5]] * 2)
    args = (keys, values, counts, set_ids, pivots, 5.0, "bias", True)

    monkeypatch.setattr(backends, "kernels_usable", lambda device: True)
    backends.merge_sets(*args)  # no run active: reference
    for name, expected in (("sdpa", "ref"), ("triton", "triton"), ("flash", "triton")):
        with backends.active_backend(name):
            backends.merge_sets(*args)
        assert calls[-1] == expected, name
    with backends.active_backend("triton"):
        sims = backends.adjacent_similarity(keys.view(1, 2, 6, 8))
    assert calls[-1] == "cos" and sims.shape == (1, 2, 5)
    monkeypatch.setattr(backends, "kernels_usable", lambda device: False)  # e.g. CPU tensors, no interpreter
    with backends.active_backend("triton"):
        backends.merge_sets(*args)
        backends.adjacent_similarity(keys.view(1, 2, 6, 8))
    assert calls[-1] == "ref" and calls.count("cos") == 1
    assert calls[0] == "ref"


def test_kernel_dispatch_torch_similarity_unchanged():
    """The reference path computes exactly what KVMerger computed before (CPU unchanged)."""
    keys = torch.randn(1, 2, 9, 16)
    kf = keys.float()
    expect = torch.nn.functional.cosine_similarity(kf[:, :, :-1], kf[:, :, 1:], dim=-1, eps=1e-8)
    assert torch.equal(backends.adjacent_similarity(keys), expect)


def test_kernel_dispatch_kernels_usable(monkeypatch):
    monkeypatch.setattr(backends, "triton_importable", lambda: True)
    monkeypatch.setattr(backends, "interpret_mode", lambda: False)
    assert backends.kernels_usable("cuda") and not backends.kernels_usable("cpu")
    monkeypatch.setattr(backends, "interpret_mode", lambda: True)
    assert backends.kernels_usable("cpu")
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    assert not backends.kernels_usable("cuda")


# ------------------------------------------------------------------- flash: when it is exact


def flash_index_mask(lq: int, lk: int, window_left: int) -> torch.Tensor:
    """flash-attn's documented mask: causal aligned bottom-right, optional left window."""
    i = torch.arange(lq).view(-1, 1)
    j = torch.arange(lk).view(1, -1)
    ok = j <= i + lk - lq
    if window_left >= 0:
        ok = ok & (j >= i + lk - lq - window_left)
    return ok


def plan(q_pos, k_pos, bias=None, window=None, dtype=torch.float16, d=16, dv=16, device="cuda"):
    return flash.flash_plan(q_pos, k_pos, bias, window, dtype, d, dv, device)


def chunk_layout(prefix: list[int], p0: int, lq: int, heads: int = 1):
    q_pos = torch.arange(p0, p0 + lq)
    k = torch.tensor(prefix + list(range(p0, p0 + lq)))
    return q_pos, k.view(1, 1, -1).expand(1, heads, -1)


def test_kernel_flash_plan_full_cache_and_compressed_prefix():
    q, k = chunk_layout(list(range(20)), 20, 5)  # untouched cache, a chunk of 5
    assert plan(q, k) == flash.FlashPlan(True, "", -1)
    q, k = chunk_layout([0, 1, 4, 9, 13, 19], 20, 5)  # evicted/merged prefix: gaps are fine
    assert plan(q, k).ok
    q, k = chunk_layout([0, 3, 7], 8, 1)  # one decoding step
    assert plan(q, k).ok


def test_kernel_flash_plan_windows():
    q, k = chunk_layout(list(range(13, 20)), 20, 4)  # a sliding-window layer: contiguous
    p = plan(q, k, window=8)
    assert p.ok and p.window_left == 7
    q, k = chunk_layout([0, 1, 2, 30, 33, 36], 40, 3)  # gaps inside the window's reach
    assert not plan(q, k, window=8).ok
    q, k = chunk_layout([0, 1, 2] + list(range(35, 40)), 40, 3)  # 34..33 missing: flash's window would reach 1, 2
    assert not plan(q, k, window=8).ok
    q, k = chunk_layout([0, 1, 31] + list(range(33, 40)), 40, 3)  # gaps only beyond every query's window
    assert plan(q, k, window=8).ok
    q, k = chunk_layout([0, 1, 2, 33] + list(range(35, 40)), 40, 3)  # 33 > 40 - 8: reachable, gap
    assert not plan(q, k, window=8).ok


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(bias=torch.zeros(1, 1, 25)), "bias"),
        (dict(dtype=torch.float32), "float16"),
        (dict(device="cpu"), "cuda"),
        (dict(d=16, dv=32), "head dim"),
        (dict(d=512, dv=512), "head dim"),
    ],
)
def test_kernel_flash_plan_declines(kwargs, needle):
    q, k = chunk_layout(list(range(20)), 20, 5)
    p = plan(q, k, **kwargs)
    assert not p.ok and needle in p.reason.lower() and "\n" not in p.reason


def test_kernel_flash_plan_declines_layouts():
    q = torch.arange(20, 25)
    assert not plan(q, torch.arange(25).flip(0).view(1, 1, -1)).ok  # reversed
    assert not plan(q, torch.tensor([0, 1, 2, 22, 20, 21, 23, 24]).view(1, 1, -1)).ok  # a prefix key in the future
    assert not plan(torch.tensor([20, 22, 23]), torch.tensor([0, 20, 22, 23]).view(1, 1, -1)).ok  # gapped queries
    assert not plan(torch.arange(5, 10), torch.arange(3).view(1, 1, -1)).ok  # fewer keys than queries
    q, k = chunk_layout([0, 5, 9], 10, 2, heads=2)
    k = k.clone()
    k[0, 1, 2] = 11  # one head's prefix entry after the queries
    assert not plan(q, k).ok


def random_layout(gen, lq, window):
    """A random cache layout: mostly kvcli-like (sorted prefix + the chunk), sometimes broken."""
    p0 = int(torch.randint(lq, 60, (1,), generator=gen))
    n_prefix = int(torch.randint(0, p0 + 1, (1,), generator=gen))
    prefix = sorted(torch.randperm(p0, generator=gen)[:n_prefix].tolist())
    if torch.rand(1, generator=gen) < 0.3:
        prefix = list(range(p0 - n_prefix, p0))  # contiguous (full or window layer)
    q, k = chunk_layout(prefix, p0, lq, heads=2)
    k = k.clone()
    r = float(torch.rand(1, generator=gen))
    if r < 0.15 and k.shape[-1] > 1:
        k[0, 1] = k[0, 1][torch.randperm(k.shape[-1], generator=gen)]  # shuffled
    elif r < 0.25:
        k[0, :, -1] += 1  # newest key not at the last query's position
    return q, k


@pytest.mark.parametrize("seed", range(4))
def test_kernel_flash_plan_accepts_only_exact_layouts(seed):
    """Property: whenever the plan accepts, flash-attn's index mask equals kvcli's
    position mask (so its output is the reference output); plain chunk layouts with no
    window are always accepted."""
    gen = torch.Generator().manual_seed(seed)
    accepted = 0
    for _ in range(150):
        lq = int(torch.randint(1, 6, (1,), generator=gen))
        window = None if torch.rand(1, generator=gen) < 0.5 else int(torch.randint(1, 12, (1,), generator=gen))
        q, k = random_layout(gen, lq, window)
        p = plan(q, k, window=window)
        mine = allowed_mask(q, k, window)[0]  # [H, Lq, Lk]
        if p.ok:
            accepted += 1
            theirs = flash_index_mask(lq, k.shape[-1], p.window_left)
            assert torch.equal(mine, theirs.expand_as(mine)), (q, k, window)
        elif window is None:
            same_layout = bool((k[0, 0] == k[0, 1]).all())
            sorted_ok = bool((k[0, :, : k.shape[-1] - lq] < q[0]).all()) and bool((k[0, :, -lq:] == q).all())
            assert not (same_layout and sorted_ok), (q, k)
    assert accepted > 20


# ------------------------------------------------------------------- flash: the wrapper itself


def fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **kw):
    """flash-attn's documented semantics in torch ([B, L, H, D] layout, GQA by head groups)."""
    assert dropout_p == 0.0 and causal and window_size[1] in (0, -1)
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(hq // hkv, dim=2)
    vv = v.repeat_interleave(hq // hkv, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), kk.float()) * softmax_scale
    logits = logits.masked_fill(~flash_index_mask(lq, lk, window_size[0]), -math.inf)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(logits, -1), vv.float())
    return out.to(q.dtype)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("hkv", [1, 2])
def test_kernel_flash_wrapper_layout_matches_reference(monkeypatch, window, hkv):
    monkeypatch.setattr(flash, "_import_flash", lambda: (fake_flash_attn_func, ""))
    gen = torch.Generator().manual_seed(1)
    lq, p0 = 4, 12
    q_pos, k_pos = chunk_layout(list(range(p0)) if window else [0, 2, 5, 9, 11], p0, lq)
    lk = k_pos.shape[-1]
    query = torch.randn(1, 4, lq, 16, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)  # strided like HF
    key, value = torch.randn(1, hkv, lk, 16, generator=gen), torch.randn(1, hkv, lk, 16, generator=gen)
    p = plan(q_pos, k_pos, window=window)
    assert p.ok
    out = flash.run_flash(query, key, value, 0.25, p)
    ref = attend(query, key, value, q_pos, k_pos, None, 0.25, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_kernel_flash_attend_declines_to_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("flash must not be called for this layout")

    monkeypatch.setattr(flash, "_import_flash", lambda: (boom, ""))
    gen = torch.Generator().manual_seed(2)
    q_pos, k_pos = chunk_layout([0, 3], 5, 2)
    query = torch.randn(1, 2, 2, 8, generator=gen)
    key, value = torch.randn(1, 1, 4, 8, generator=gen), torch.randn(1, 1, 4, 8, generator=gen)
    bias = torch.log(torch.tensor([[[3.0, 1.0, 1.0, 1.0]]]))
    used = []

    def fallback(*args):
        used.append(True)
        return attend(*args)

    out = flash.flash_attend(query, key, value, q_pos, k_pos, bias, 0.3, None, fallback=fallback)  # CPU + bias
    assert used and torch.equal(out, attend(query, key, value, q_pos, k_pos, bias, 0.3, None))
    out = backends.get_backend("flash")(query, key, value, q_pos, k_pos, bias, 0.3, None)  # real fallback choice
    torch.testing.assert_close(out, attend(query, key, value, q_pos, k_pos, bias, 0.3, None), atol=1e-5, rtol=1e-5)
