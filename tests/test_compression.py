"""The compressed cache: physically bounded, byte counts from tensors, positions right."""

import copy

import pytest
import torch

from kvcli import api
from kvcli.cache import GrowingLayer
from kvcli.core.budget import parse_budget
from kvcli.methods import method_names

from conftest import IdTokenizer, sharpen, tiny_gemma3, tiny_llama

# Token-budget methods; plain ``pod`` keeps every token (its saving is structural: tests in test_pod.py).
COMPRESSING = [m for m in method_names() if m not in ("full", "pod")]
# Variants whose layout differs from their method's default: name -> (method, options).
VARIANTS = {
    "kvmerger:sets=kept": ("kvmerger", {"sets": "kept"}),
    "pod+kvmerger:sets=kept": ("pod+kvmerger", {"kvmerger.sets": "kept"}),
}


def tensor_bytes(cache) -> int:
    """Independent count: every tensor attribute of every layer object."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("shape", ["gqa", "mqa", "gemma3"])
@pytest.mark.parametrize("method", COMPRESSING + list(VARIANTS))
@pytest.mark.parametrize("budget", ["40:uniform", "0.5:uniform", "40:heads", "0.5:heads"])
def test_cache_bounded_by_budget_plus_chunk(shape, method, budget):
    model = {"gqa": lambda: tiny_llama(2), "mqa": lambda: tiny_llama(1), "gemma3": tiny_gemma3}[shape]()
    lm = api.wrap_model(model, IdTokenizer())
    chunk, doc_len = 16, 400  # ten times the absolute budget
    b = parse_budget(budget)
    checks = []
    from kvcli.methods import make_method

    name, options = VARIANTS.get(method, (method, {}))
    meth = make_method(name, **options)
    original = meth.compress

    floor = meth.n_sink + 1 if method.startswith("pod+") else 0  # PoD's sinks are never merged

    def checked(cache, bud):
        # uniform: every layer holds the target; ranked across layers and heads: they add up to it
        lengths = [layer.length for layer in cache.growing_layers]
        bound = max if bud.allocation == "uniform" else (lambda xs: sum(xs) / len(xs))
        if cache.seen > chunk:  # before compressing: at most the last target plus one chunk
            assert bound(lengths) <= max(bud.target(cache.seen - chunk), floor) + chunk
        original(cache, bud)
        target = bud.target(cache.seen)
        lengths = [layer.length for layer in cache.growing_layers]
        assert min(lengths) == max(lengths) or bud.allocation != "uniform"
        assert bound(lengths) == min(max(target, floor), cache.seen), (lengths, target)
        for layer in cache.growing_layers:
            assert layer.values.shape[2] == layer.length  # physical, not masked
            if layer.keys is not None:  # PoD members hold no distant keys at all
                assert layer.keys.shape[2] == layer.length
        assert cache.nbytes() == tensor_bytes(cache)
        checks.append(cache.seen)

    meth.compress = checked
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (doc_len,))
    from kvcli.engine.engine import Engine

    eng = Engine(lm.model, meth, b, chunk_size=chunk)
    eng.prefill(ids.view(1, -1))
    assert len(checks) == doc_len // chunk
    rep = eng.cache.report(torch.float32)
    assert rep.kv_bytes == tensor_bytes(eng.cache)
    assert rep.kv_bytes < rep.kv_bytes_full
    # Layers that do not grow with the document keep their window untouched.
    for layer in eng.cache.layers:
        if not isinstance(layer, GrowingLayer):
            assert layer.keys.shape[2] == layer.sliding_window - 1


@pytest.mark.parametrize("method", ["streaming", "snapkv", "h2o"])
def test_positions_after_eviction_match_reference(method):
    """One-layer MQA model: the kept entries' K/V depend only on their token and position, so
    decoding from the compressed cache must equal an uncompressed run over exactly the kept
    tokens at their original positions."""
    model = sharpen(tiny_llama(num_kv_heads=1, layers=1))
    ref_model = copy.deepcopy(model)
    lm = api.wrap_model(model, IdTokenizer())
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (120,))
    ctx = api.prefill(lm, ids, method=method, budget="30", chunk_size=16, raw=True)
    layer = ctx.engine.cache.layers[0]
    kept = layer.key_positions()[0, 0]
    assert layer.length == 30 and kept.tolist() != list(range(30))
    new = torch.randint(3, 128, (5,))
    got = []
    for t in new.tolist():
        got.append(ctx.engine.forward(torch.tensor([[t]])))
    ref_ids = torch.cat([ids[kept], new]).view(1, -1)
    ref_pos = torch.cat([kept, torch.arange(120, 125)]).view(1, -1)
    with torch.inference_mode():
        ref = ref_model(input_ids=ref_ids, position_ids=ref_pos).logits[0, -5:]
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4)


def test_uncompressed_positions_would_differ():
    """The reference test above can fail: numbering the kept tokens contiguously instead of
    at their original (gapped) positions changes the logits."""
    model = sharpen(tiny_llama(num_kv_heads=1, layers=1))
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (40,))
    gapped = torch.cat([torch.arange(4), torch.arange(60, 96)]).view(1, -1)
    with torch.inference_mode():
        a = model(input_ids=ids.view(1, -1), position_ids=gapped).logits[0, -1]
        b = model(input_ids=ids.view(1, -1), position_ids=torch.arange(40).view(1, -1)).logits[0, -1]
    assert (a - b).abs().max() > 1e-2


def test_decode_appends_in_place():
    lm = api.wrap_model(tiny_llama(2), IdTokenizer())
    ctx = api.prefill(lm, torch.randint(3, 128, (64,)), method="streaming", budget="32", chunk_size=16, raw=True)
    layer = ctx.engine.cache.growing_layers[0]
    ctx.engine.cache.reserve(8)
    ptr = layer.keys.data_ptr()
    for t in range(5):
        ctx.engine.forward(torch.tensor([[5 + t]]))
    assert layer.keys.data_ptr() == ptr and layer.length == 37


def test_questions_leave_context_unchanged():
    lm = api.wrap_model(tiny_llama(2), IdTokenizer())
    ctx = api.prefill(lm, torch.randint(3, 128, (64,)), method="h2o", budget="0.5", chunk_size=16, raw=True)
    ctx._eos = lambda: set()
    first = ctx.generate_ids([7, 8, 9], 6)
    other = ctx.generate_ids([10, 11], 6)
    again = ctx.generate_ids([7, 8, 9], 6)
    assert first == again and ctx.engine.cache.seen == 64
    assert len(other) == 6
