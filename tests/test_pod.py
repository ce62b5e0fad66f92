"""PoD: members attend with their own proximal keys and the anchor's distant keys, hold no
distant keys at all, equal the full cache while the document fits the proximal window,
answer several questions from one context, and reject bad options."""

import copy
from contextlib import contextmanager

import pytest
import torch
from transformers import AttentionInterface

from kvcli import api
from kvcli.attention.function import ATTN_NAME, kvcli_attention
from kvcli.cache import GrowingLayer, SharedKeyLayer, WindowLayer
from kvcli.core.budget import Budget
from kvcli.core.errors import KvcliError
from kvcli.engine.engine import Engine
from kvcli.methods import make_method
from kvcli.profile.estimate import estimate_kv_bytes
from kvcli_kernels import pod_attention

from conftest import IdTokenizer, sharpen, tiny_gemma3, tiny_llama

POD_METHODS = ["pod", "pod+kvmerger", "pod+snapkv"]
# A proximal window far shorter than the document: 4 sinks, a recent window of
# max(8, ceil(0.05 x seen)) positions (10 after 200 tokens).
SMALL = dict(n_sink=4, recent_min=8, recent=0.05)
DOC, CHUNK = 200, 16
N_S, N_R = 4, 10  # n_r = max(8, ceil(0.05 * 200))

MODELS = {
    "llama-gqa": lambda: tiny_llama(num_kv_heads=2, layers=4),  # growing 0-3: blocks [0, 1], [2, 3]
    "gemma3": lambda: tiny_gemma3(layers=6),  # growing 1, 3, 5: blocks [1, 3], [5]
}


@pytest.fixture(autouse=True)
def no_calibration_profiles(tmp_path, monkeypatch):
    """Blocks come from block_size here: no calibration profile from the user's cache applies."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models():
    return {name: sharpen(make()) for name, make in MODELS.items()}


def doc_ids(n: int = DOC, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def wrap(model):
    return api.wrap_model(copy.deepcopy(model), IdTokenizer())


def prefill(model, ids, method, budget="1", chunk=CHUNK, options=None):
    ctx = api.prefill(
        wrap(model), ids, method=method, budget=budget, chunk_size=chunk, raw=True, method_options=options
    )
    ctx._eos = lambda: set()  # raw ids: decode a fixed number of tokens
    return ctx


def members(cache) -> list[SharedKeyLayer]:
    return [layer for layer in cache.layers if isinstance(layer, SharedKeyLayer)]


def tensor_bytes(obj) -> int:
    """Independent count: every tensor attribute of a layer (or of every layer of a cache)."""
    layers = obj.layers if hasattr(obj, "layers") else [obj]
    seen, total = set(), 0
    for layer in layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def key_bytes_per_entry(cache, dtype=torch.float32) -> int:
    """One entry's keys (or values) over the KV heads."""
    return cache.num_kv_heads * cache.head_dim * torch.empty((), dtype=dtype).element_size()


# ---- (a) within the proximal window PoD is the full cache -------------------------------------------
def reference_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt.view(1, -1), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, prompt.numel() :].tolist()


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("method", POD_METHODS)
@pytest.mark.parametrize("chunk", [1, 16, 37])
def test_pod_within_the_proximal_window_equals_the_full_cache(models, shape, method, chunk):
    """Document (61 tokens) + answer shorter than recent_min (256): every entry is proximal, so
    members attend with their own keys only and greedy tokens equal ``generate()``."""
    model = models[shape]
    prompt = doc_ids(61, seed=1)
    ctx = prefill(model, prompt, method, budget="1.0", chunk=chunk)
    shared = members(ctx.engine.cache)
    assert shared and all(isinstance(m.anchor, GrowingLayer) for m in shared)
    for m in shared:  # no distant entry: the member's keys are its own, all of them
        head, distant, tail = m.key_parts()
        assert distant.shape[2] == 0 and head.shape[2] + tail.shape[2] == m.length == 61
    got = ctx.generate_ids(None, 12)
    assert got == reference_tokens(model, prompt, 12)
    assert got == prefill(model, prompt, "full", chunk=chunk).generate_ids(None, 12)


def test_pod_beyond_the_proximal_window_shares_keys(models):
    """The test above can fail: with a short proximal window the shared distant keys change
    the logits, while block_size=1 (every layer its own anchor) stays the full cache."""
    model, ids = models["llama-gqa"], doc_ids()
    full = prefill(model, ids, "full").engine.last_logits
    own = prefill(model, ids, "pod", options=dict(SMALL, block_size=1))
    assert not members(own.engine.cache)
    torch.testing.assert_close(own.engine.last_logits, full, rtol=0, atol=1e-5)
    shared = prefill(model, ids, "pod", options=SMALL).engine.last_logits
    assert (shared - full).abs().max() > 1e-3


# ---- (b) one softmax over own proximal keys and the anchor's distant keys ----------------------------
@contextmanager
def spy_attention():
    """Record query, keys, values, scaling and output of every attention call (by layer)."""
    calls: dict[int, dict] = {}

    def spy(module, query, key, value, *args, **kwargs):
        out = kvcli_attention(module, query, key, value, *args, **kwargs)
        calls[module.layer_idx] = dict(
            q=query.clone(),
            k=key.clone(),
            v=value.clone(),
            scaling=kwargs["scaling"],
            out=out[0].transpose(1, 2).clone(),
        )  # back to [B, Hq, Lq, D]
        return out

    AttentionInterface.register(ATTN_NAME, spy)
    try:
        yield calls
    finally:
        AttentionInterface.register(ATTN_NAME, kvcli_attention)


def softmax_attention(q, k, v, scaling):
    """By hand: per query head, softmax(q k^T * scaling) v over the keys of its KV head."""
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        logits = q[0, h].double() @ k[0, kh].double().T * scaling
        out[0, h] = torch.softmax(logits, dim=-1) @ v[0, kh].double()
    return out.float()


def test_member_attention_is_one_softmax_over_own_proximal_and_anchor_distant_keys(models):
    model = models["llama-gqa"]
    ids, new = doc_ids(), 77
    ctx = prefill(model, ids, "pod", options=SMALL)
    cache = ctx.engine.cache
    anchor, member = cache.layers[0], cache.layers[1]
    assert isinstance(member, SharedKeyLayer) and member.anchor is anchor and not isinstance(anchor, SharedKeyLayer)
    assert (member.head_keys.shape[2], member.n_tail, member.length) == (N_S, N_R, DOC)
    with spy_attention() as calls:  # decode one token at position 200
        ctx.engine.forward(torch.tensor([[new]]))
    call = calls[1]

    # Independent reference: the uncompressed model over the same 201 tokens.  Layer 0 (the
    # anchor) attends exactly under PoD, so layer 1's inputs, hence its own keys and values,
    # are the reference's; the anchor's keys are the reference's layer-0 keys.
    ref_model = copy.deepcopy(model)
    with torch.inference_mode():
        past = ref_model(input_ids=torch.cat([ids, torch.tensor([new])]).view(1, -1), use_cache=True).past_key_values
    k_anchor, k_own, v_own = past.layers[0].keys, past.layers[1].keys, past.layers[1].values
    t = DOC + 1
    prox = torch.cat([torch.arange(N_S), torch.arange(DOC - N_R, t)])  # sinks, recent window, new token
    dist = torch.arange(N_S, DOC - N_R)
    # the member's distant keys really are the anchor's, not what the member computes itself
    assert (k_anchor[:, :, dist] - k_own[:, :, dist]).abs().max() > 0.1

    expect_k = k_own.clone()
    expect_k[:, :, dist] = k_anchor[:, :, dist]
    torch.testing.assert_close(call["k"], expect_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call["v"], v_own, rtol=1e-5, atol=1e-5)

    hkv = k_own.shape[1]

    def per_head(p):
        return p.view(1, 1, -1).expand(1, hkv, -1)

    q, scaling = call["q"], call["scaling"]
    assert scaling == pytest.approx(k_own.shape[-1] ** -0.5)
    ref = pod_attention(
        q,
        k_own[:, :, prox],
        v_own[:, :, prox],
        per_head(prox),
        k_anchor[:, :, dist],
        v_own[:, :, dist],
        per_head(dist),
        None,
        None,
        torch.tensor([[DOC]]),
        scaling,
    )
    torch.testing.assert_close(call["out"], ref, rtol=1e-4, atol=1e-5)
    by_hand = softmax_attention(
        q,
        torch.cat([k_own[:, :, prox], k_anchor[:, :, dist]], 2),
        torch.cat([v_own[:, :, prox], v_own[:, :, dist]], 2),
        scaling,
    )
    torch.testing.assert_close(call["out"], by_hand, rtol=1e-4, atol=1e-5)
    # ... and the reference tells the difference: the member's own keys would give another output
    own = softmax_attention(q, k_own, v_own, scaling)
    assert (own - by_hand).abs().max() > 1e-3

    # The second block (anchor 2, member 3): its distant keys are read from layer 2's cache.
    m3, a3 = cache.layers[3], cache.layers[2]
    assert m3.anchor is a3
    n_dist = m3.length - m3.head_keys.shape[2] - m3.n_tail
    assert n_dist == DOC - N_S - N_R
    assert torch.equal(calls[3]["k"], torch.cat([m3.head_keys, a3.keys[:, :, N_S : N_S + n_dist], m3.tail_keys], 2))


def test_pod_kvmerger_member_reads_the_merged_distant_keys_with_count_bias(models):
    """pod+X compresses a block's distant entries with one layout: the member's distant keys
    are the anchor's merged keys, its values its own merged values, counts bias the logits."""
    ctx = prefill(models["llama-gqa"], doc_ids(), "pod+kvmerger", budget="0.5", options=SMALL)
    cache = ctx.engine.cache
    anchor, member = cache.layers[0], cache.layers[1]
    assert member.length == anchor.length == 100 and (member.head_keys.shape[2], member.n_tail) == (N_S, N_R)
    assert torch.equal(member.key_positions(), anchor.key_positions())  # layouts in step
    assert member.entry_counts().max() > 1  # distant entries were merged
    with spy_attention() as calls:
        ctx.engine.forward(torch.tensor([[77]]))
    call = calls[1]
    n = member.length  # 101 with the new token
    sl = slice(N_S, n - N_R - 1)
    pos, bias = member.key_positions(), torch.log(member.entry_counts())
    keys = torch.cat([member.head_keys, anchor.keys[:, :, sl], member.tail_keys], 2)
    assert torch.equal(call["k"], keys)
    prox = torch.cat([torch.arange(N_S), torch.arange(sl.stop, n)])
    ref = pod_attention(
        call["q"],
        keys[:, :, prox],
        call["v"][:, :, prox],
        pos[:, :, prox],
        anchor.keys[:, :, sl],
        call["v"][:, :, sl],
        pos[:, :, sl],
        bias[:, :, prox],
        bias[:, :, sl],
        torch.tensor([[DOC]]),
        call["scaling"],
    )
    torch.testing.assert_close(call["out"], ref, rtol=1e-4, atol=1e-5)
    no_bias = pod_attention(
        call["q"],
        keys[:, :, prox],
        call["v"][:, :, prox],
        pos[:, :, prox],
        anchor.keys[:, :, sl],
        call["v"][:, :, sl],
        pos[:, :, sl],
        None,
        None,
        torch.tensor([[DOC]]),
        call["scaling"],
    )
    assert (no_bias - ref).abs().max() > 1e-4


# ---- (c) the saving is physical ------------------------------------------------------------------
META = ("positions", "counts", "scores", "obs")


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("method", POD_METHODS)
def test_members_hold_no_distant_keys(models, shape, method):
    model = models[shape]
    ctx = prefill(model, doc_ids(), method, budget="0.5", options=SMALL)
    cache = ctx.engine.cache
    kb = key_bytes_per_entry(cache)
    heads = cache.num_kv_heads
    length = DOC if method == "pod" else 100  # plain pod ignores the budget
    shared = members(cache)
    assert shared
    distant = 0
    for m in shared:
        tensors = {k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        assert m.keys is None and set(tensors) <= {"head_keys", "tail_keys", "values", *META}
        h, t = m.head_keys.shape[2], m.n_tail
        assert (h, t, m.length, m.values.shape[2]) == (N_S, N_R, length, length)
        for name in META:
            if name in tensors:
                assert tensors[name].shape == (1, heads, length)
        meta = sum(tensors[k].numel() * tensors[k].element_size() for k in META if k in tensors)
        assert m.nbytes() == tensor_bytes(m) == (h + t + length) * kb + meta
        distant += (length - h - t) * kb
    # every tensor of the cache owns exactly its bytes: no view keeps dropped keys alive
    for layer in cache.layers:
        for name, v in vars(layer).items():
            if isinstance(v, torch.Tensor):
                held, used = v.untyped_storage().nbytes(), v.numel() * v.element_size()
                assert held == used, f"layer {layer.layer_idx} {name}: storage {held} bytes for {used}"
    rep = ctx.report()
    assert rep.kv_bytes == cache.nbytes() == tensor_bytes(cache) == sum(rep.kv_bytes_all_layers)
    # the same run with every layer its own anchor holds exactly the members' distant keys more
    alone = prefill(model, doc_ids(), method, budget="0.5", options=dict(SMALL, block_size=1))
    assert alone.report().kv_bytes - rep.kv_bytes == distant > 0
    if method == "pod":
        assert rep.kv_bytes_full - rep.kv_bytes == distant
        assert alone.report().kv_bytes == rep.kv_bytes_full


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("method", POD_METHODS)
@pytest.mark.parametrize("budget", ["0.5", "0.97", "40", "1.0"])
@pytest.mark.parametrize(
    "options",
    [SMALL, dict(SMALL, block_size=3, n_sink=20), dict(n_sink=4, recent_min=64, recent=0.0)],
    ids=["pairs", "triples", "wide"],
)
def test_estimate_equals_measured_bytes_beyond_the_proximal_window(models, shape, method, budget, options):
    """The estimate replays PoD's windows, not only within recent_min (tests/test_profile.py):
    0.97 at chunk 16 leaves some chunks within budget after a compression, where the recent
    window is not squeezed ("wide": wider than the members' tail then); n_sink=20 exceeds a chunk."""
    ctx = prefill(models[shape], doc_ids(), method, budget=budget, options=options)
    rep, stats = ctx.report(), ctx.engine.stats
    est = estimate_kv_bytes(
        models[shape].config, DOC, method, budget, "float32", chunk_size=CHUNK, method_options=options
    )
    assert est.kv_bytes == rep.kv_bytes == tensor_bytes(ctx.engine.cache)
    assert est.kv_bytes_all_layers == rep.kv_bytes_all_layers
    assert est.kept_tokens == rep.kept_tokens and est.kv_bytes_full == rep.kv_bytes_full
    assert est.peak_prefill_kv_bytes == stats.max_cache_bytes and est.trace == stats.trace
    assert est.method_options["blocks"] == rep.method_options["blocks"]
    for row, layer in zip(est.per_layer, ctx.engine.cache.layers, strict=True):
        if isinstance(layer, SharedKeyLayer):
            assert row.keys == tensor_bytes_of(layer.head_keys, layer.tail_keys)
            assert row.values == tensor_bytes_of(layer.values)
    if method == "pod":
        assert est.budget == "1"  # the budget does not apply to plain pod, as in the engine


def tensor_bytes_of(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ---- (d) several questions from one context ----------------------------------------------------------
def cache_state(cache) -> list:
    out = [cache.seen, cache.nbytes()]
    for layer in cache.layers:
        if isinstance(layer, SharedKeyLayer):
            out.append((layer.length, layer.head_keys.clone(), layer.tail_keys.clone(), layer.valid("values").clone()))
        elif isinstance(layer, GrowingLayer):
            out.append((layer.length, layer.valid("keys").clone(), layer.valid("values").clone()))
        elif isinstance(layer, WindowLayer):
            out.append((layer.seen, layer.keys.clone(), layer.values.clone()))
    return out


def same_state(a, b) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, (tuple, list)):
            return len(x) == len(y) and all(eq(i, j) for i, j in zip(x, y, strict=True))
        return x == y

    return eq(a, b)


@pytest.mark.parametrize("shape", list(MODELS))
@pytest.mark.parametrize("method,budget", [("pod", "1"), ("pod+kvmerger", "0.5"), ("pod+snapkv", "0.5")])
def test_several_questions_from_one_pod_context(models, shape, method, budget):
    model = models[shape]
    ctx = prefill(model, doc_ids(), method, budget=budget, options=SMALL)
    before = cache_state(ctx.engine.cache)
    long_question = list(range(10, 40))  # longer than the members' recent window
    first = ctx.generate_ids([7, 8, 9], 8)
    other = ctx.generate_ids(long_question, 8)
    again = ctx.generate_ids([7, 8, 9], 8)
    assert first == again and len(other) == 8
    ctx.engine.cache.compact()  # decoding reserved room (counted by nbytes); the context is as it was
    assert same_state(cache_state(ctx.engine.cache), before)
    # a question after others gets what it gets from a fresh context
    fresh = prefill(model, doc_ids(), method, budget=budget, options=SMALL)
    assert fresh.generate_ids(long_question, 8) == other
    # Context.ask: the same answer twice; teacher-forced likelihoods too
    a1 = ctx.ask("What is the main point?", max_new_tokens=6)
    a2 = ctx.ask("What is the main point?", max_new_tokens=6)
    assert a1.tokens == a2.tokens and a1.text == a2.text
    assert ctx.answer_logprob("Who?", "the keeper") == ctx.answer_logprob("Who?", "the keeper")
    ctx.engine.cache.compact()
    assert same_state(cache_state(ctx.engine.cache), before)


def test_checkpoint_before_any_forward(models):
    """A PoD cache can be checkpointed before anything was forwarded (members not initialised)."""
    lm = wrap(models["llama-gqa"])
    eng = Engine(lm.model, make_method("pod", **SMALL), Budget(ratio=1.0), chunk_size=CHUNK)
    mark = eng.cache.checkpoint()
    eng.forward(doc_ids(5, seed=3).view(1, -1))
    eng.cache.rollback(mark)
    assert eng.cache.seen == 0 and all(layer.length == 0 for layer in eng.cache.growing_layers)
    eng.prefill(doc_ids().view(1, -1))
    ref = Engine(wrap(models["llama-gqa"]).model, make_method("pod", **SMALL), Budget(ratio=1.0), chunk_size=CHUNK)
    ref.prefill(doc_ids().view(1, -1))
    torch.testing.assert_close(eng.last_logits, ref.last_logits, rtol=0, atol=1e-6)


# ---- (e) bad options ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pod", "pod+kvmerger"])
@pytest.mark.parametrize(
    "options,match",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size="two"), "integer"),
        (dict(n_sink=-1), "n_sink"),
        (dict(recent=1.5), "recent"),
        (dict(recent_min=-3), "recent_min"),
        (dict(blocks=[[0, 1], [2]]), "partition"),  # layer 3 missing
        (dict(blocks=[[0, 1], [1, 2, 3]]), "partition"),  # layer 1 twice
        (dict(blocks=[[0, 1], [2, 3, 4]]), "partition"),  # no layer 4
        (dict(blocks=[[0, 1], [], [2, 3]]), "non-empty"),
        (dict(blocks=[0, 1, 2, 3]), "lists of layer indices"),
        (dict(blocks=[[0, 1.5], [2, 3]]), "lists of layer indices"),
        (dict(blocks=[[0, 2], [1, 3]]), "consecutive"),
        (dict(blocks=[[1, 0], [2, 3]]), "consecutive"),
        (dict(profile="/nonexistent/calibration.json"), "no such file"),
    ],
)
def test_invalid_pod_options_are_kvcli_errors(models, method, options, match):
    with pytest.raises(KvcliError, match=match):
        prefill(models["llama-gqa"], doc_ids(40), method, budget="0.5", options=options)


def test_blocks_must_be_growing_layers_and_estimates_check_them_too(models, tmp_path):
    # Gemma 3 here: layers 0, 2, 4 slide; 1, 3, 5 grow.
    with pytest.raises(KvcliError, match="partition"):
        prefill(models["gemma3"], doc_ids(40), "pod", options=dict(blocks=[[0, 1], [3, 5]]))
    with pytest.raises(KvcliError, match="partition"):
        estimate_kv_bytes(models["gemma3"].config, 100, "pod", "1", "float32", method_options=dict(blocks=[[1, 3]]))
    bad = tmp_path / "calibration.json"
    bad.write_text('{"blocks": [[1, 3], 5]}')
    with pytest.raises(KvcliError, match="calibration profile"):
        prefill(models["gemma3"], doc_ids(40), "pod", options=dict(profile=str(bad)))
    good = tmp_path / "good.json"
    good.write_text('{"blocks": [[1], [3, 5]]}')
    ctx = prefill(models["gemma3"], doc_ids(40), "pod", options=dict(profile=str(good)))
    assert ctx.engine.method.chosen_blocks == [[1], [3, 5]] and [m.layer_idx for m in members(ctx.engine.cache)] == [5]
