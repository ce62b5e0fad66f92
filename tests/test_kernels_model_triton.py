"""A tiny model end to end through kvcli with ``backend="triton"`` (Triton's CPU
interpreter) gives what ``backend="sdpa"`` gives: same greedy tokens, logits within float
tolerance, for the full cache, KVMerger, PoD and pod+kvmerger at a budget.  Spies check the
kernels really ran: the attention kernel, the PoD kernel (distant keys read in place from
the anchor, no assembled keys) and the merge kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import (conftest sets it first)

import pytest
import torch

from kvcli import api
from kvcli.attention import backends
from kvcli.cache import SharedKeyLayer
from kvcli.core.budget import Budget
from kvcli.engine.engine import Engine
from kvcli.engine.scoring import Scoring
from kvcli.methods import make_method
from kvcli_kernels import triton_available

from conftest import sharpen, tiny_gemma3, tiny_llama

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton and a GPU or TRITON_INTERPRET=1")
# The interpreter runs on CPU tensors; with TRITON_INTERPRET=0 on a GPU machine, the same tests run on CUDA.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

POD = dict(n_sink=4, recent_min=8, recent=0.1)  # small enough that a 40-token prompt has distant entries
CASES = [
    ("full", {}, 1.0),
    ("kvmerger", {}, 0.5),
    ("pod", POD, 1.0),
    ("pod+kvmerger", POD, 0.5),
]


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, factory in (
        ("llama", lambda: tiny_llama(num_kv_heads=2, layers=2)),
        ("gemma3", lambda: tiny_gemma3(layers=4)),
    ):
        model = sharpen(factory()).to(DEVICE)
        api.wrap_model(model, None)  # kvcli's attention function
        out[name] = model
    return out


@pytest.fixture
def spies(monkeypatch):
    """Count calls of the Triton entry points kvcli uses."""
    import kvcli_kernels.triton_attention as ta
    import kvcli_kernels.triton_merge as tm
    import kvcli_kernels.triton_pod as tp

    counts = {"attention": 0, "pod": 0, "merge": 0, "cosine": 0}

    def spy(module, attr, key):
        real = getattr(module, attr)

        def wrapped(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attr, wrapped)

    spy(ta, "attention_triton", "attention")
    spy(tp, "pod_attention_triton", "pod")
    spy(tm, "merge_sets_triton", "merge")
    spy(tm, "adjacent_cosine_triton", "cosine")
    return counts


def greedy_run(model, method, options, budget, backend, n_new=5):
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 40))
    eng = Engine(model, make_method(method, **options), Budget(ratio=budget), chunk_size=16, backend=backend)
    logits = [eng.prefill(ids)]
    tokens = []
    for _ in range(n_new):
        tokens.append(int(logits[-1].argmax()))
        logits.append(eng.forward(torch.tensor([[tokens[-1]]])))
    return tokens, torch.stack(logits), eng


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("method, options, budget", CASES, ids=[c[0] for c in CASES])
def test_kernel_triton_backend_matches_sdpa_end_to_end(models, spies, arch, method, options, budget):
    model = models[arch]
    ref_tokens, ref_logits, ref_eng = greedy_run(model, method, options, budget, "sdpa")
    assert spies == {"attention": 0, "pod": 0, "merge": 0, "cosine": 0}  # sdpa never touches the kernels
    tokens, logits, eng = greedy_run(model, method, options, budget, "triton")
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-5)
    # same cache afterwards: sizes, positions and counts
    for a, b in zip(eng.cache.growing_layers, ref_eng.cache.growing_layers, strict=True):
        assert a.length == b.length
        assert torch.equal(a.key_positions(), b.key_positions())
        torch.testing.assert_close(a.entry_counts(), b.entry_counts())
    assert spies["attention"] > 0
    members = [layer for layer in eng.cache.layers if isinstance(layer, SharedKeyLayer)]
    if method.startswith("pod"):
        assert members and all(m.split_keys for m in members)
        assert spies["pod"] > 0
        assert all(m.key_parts()[1].shape[2] > 0 for m in members)  # distant keys were read from the anchor
    else:
        assert spies["pod"] == 0 and not members
    if "kvmerger" in method:
        assert spies["merge"] > 0 and spies["cosine"] > 0
        assert any(
            bool((layer.entry_counts() > 1).any()) for layer in eng.cache.growing_layers
        )  # merged: bias path ran
    else:
        assert spies["merge"] == 0


def test_kernel_triton_pod_member_update_returns_no_assembled_keys(models):
    """With the PoD kernel, a member layer's update hands transformers a zero-length
    stand-in: its distant keys are never copied into an assembled tensor."""
    eng = Engine(models["llama"], make_method("pod", **POD), Budget(ratio=1.0), chunk_size=16, backend="triton")
    eng.prefill(torch.randint(3, 128, (1, 40)))
    member = next(layer for layer in eng.cache.layers if isinstance(layer, SharedKeyLayer))
    eng.cache.begin_forward(torch.tensor([40], device=DEVICE))
    keys, values = member.update(torch.zeros(1, 2, 1, 16, device=DEVICE), torch.zeros(1, 2, 1, 16, device=DEVICE))
    assert keys.shape[2] == 0 and values.shape[2] == member.length
    head, distant, tail = member.key_parts()
    assert distant.data_ptr() == member.anchor.keys[:, :, head.shape[2] :].data_ptr()  # a view, not a copy


def test_kernel_triton_query_aware_probe_and_stats(models, spies):
    """Query-aware scoring (probe tokens observe through the torch path) and attention
    statistics work with split PoD keys: same result as sdpa."""
    model = models["llama"]
    lm = api.wrap_model(model, None)
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (1, 40))
    probe = torch.randint(3, 128, (1, 6))
    out = {}
    for backend in ("sdpa", "triton"):
        scoring = Scoring(name="question", questions=[probe[0].tolist()])
        eng = Engine(
            lm.model,
            make_method("pod+kvmerger", **POD),
            Budget(ratio=0.5),
            chunk_size=16,
            backend=backend,
            scoring=scoring,
        )
        out[backend] = (
            eng.prefill(ids),
            [layer.valid("scores") for layer in eng.cache.growing_layers],
        )
    torch.testing.assert_close(out["triton"][0], out["sdpa"][0], atol=2e-5, rtol=2e-5)
    for a, b in zip(out["triton"][1], out["sdpa"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert spies["pod"] > 0 and spies["merge"] > 0


def test_kernel_triton_backend_through_api_prefill(models):
    """``api.prefill(backend=...)`` reaches the engine; ``auto`` on CPU stays sdpa."""
    from conftest import IdTokenizer

    lm = api.wrap_model(models["llama"], IdTokenizer())
    ids = torch.randint(3, 128, (40,))
    ctx_t = api.prefill(lm, ids, method="kvmerger", budget=0.5, chunk_size=16, raw=True, backend="triton")
    ctx_a = api.prefill(lm, ids, method="kvmerger", budget=0.5, chunk_size=16, raw=True)
    assert ctx_t.engine.state.backend == "triton" and ctx_a.engine.state.backend == "sdpa"
    torch.testing.assert_close(ctx_t.engine.last_logits, ctx_a.engine.last_logits, atol=2e-5, rtol=2e-5)
    assert backends.resolve_backend("auto", "cpu") == "sdpa"
