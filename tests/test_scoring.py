"""Scoring (window / question / reconstruction) and the budget's allocation across layers."""

from __future__ import annotations

import math

import pytest
import torch

from kvcli import api
from kvcli.attention.reference import attend
from kvcli.attention.stats import ReconStats, attend_max, max_attention
from kvcli.cache import GrowingLayer
from kvcli.cache.layers import Clock
from kvcli.core.budget import Budget, parse_budget
from kvcli.core.errors import KvcliError
from kvcli.core.prompts import COMPLETION
from kvcli.engine.engine import Engine
from kvcli.engine.scoring import ReconPrompt, Scoring
from kvcli.methods import make_method
from kvcli.methods.allocation import Ranked, global_targets

from conftest import IdTokenizer, sharpen, tiny_gemma3, tiny_llama


def eager_max(query, key, q_pos, k_pos, scaling):
    """Independent reference in float64: softmax of every query head over every key it may
    see, then the maximum over queries and over the query heads of each KV group."""
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    g = hq // hkv
    out = torch.zeros(b, hkv, lk, dtype=torch.float64)
    for h in range(hq):
        kh = h // g
        logits = query[0, h].double() @ key[0, kh].double().T * scaling
        visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)
        probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
        out[0, kh] = torch.maximum(out[0, kh], probs.max(dim=0).values)
    return out


def test_max_attention_matches_eager_reference():
    torch.manual_seed(0)
    q = torch.randn(1, 6, 300, 8)  # 300 queries: more than one block of RECON_QUERY_BLOCK
    k = torch.randn(1, 2, 340, 8)
    k_pos = torch.arange(340).view(1, 1, -1)
    q_pos = torch.arange(40, 340)
    got = max_attention(q, k, q_pos, k_pos, None, 0.35)
    torch.testing.assert_close(got.double(), eager_max(q, k, q_pos, k_pos, 0.35), atol=1e-6, rtol=1e-5)


def test_max_attention_with_per_head_positions_in_any_order_and_a_bias():
    """A compressed layer: every KV head keeps its own entries (positions per head, not
    sorted), merged entries carry a bias, and some keys lie after every query of a block
    (they receive nothing); the spans ``max_attention`` skips must not change a score."""
    torch.manual_seed(3)
    hkv, g, lq, lk, d = 2, 3, 300, 420, 8
    q = torch.randn(1, hkv * g, lq, d)
    k = torch.randn(1, hkv, lk, d)
    k_pos = torch.stack([torch.randperm(lk), torch.randperm(lk)]).unsqueeze(0)  # [1, Hkv, Lk]
    q_pos = torch.arange(60, 60 + lq)  # keys at 360..419 are after every query
    bias = torch.rand(1, hkv, lk)
    got = max_attention(q, k, q_pos, k_pos, bias, 0.4)
    want = torch.zeros(1, hkv, lk, dtype=torch.float64)
    for h in range(hkv * g):
        kh = h // g
        logits = q[0, h].double() @ k[0, kh].double().T * 0.4 + bias[0, kh].double()
        visible = k_pos[0, kh].view(1, -1) <= q_pos.view(-1, 1)
        probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
        want[0, kh] = torch.maximum(want[0, kh], probs.max(dim=0).values)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[k_pos > q_pos.max()] == 0)


def _layer_with(n: int, heads: int = 2, d: int = 8) -> GrowingLayer:
    layer = GrowingLayer(Clock(), 0)
    layer.lazy_initialization(torch.zeros(1, heads, 0, d), torch.zeros(1, heads, 0, d))
    layer.keys = torch.randn(1, heads, n, d)
    layer.values = torch.randn(1, heads, n, d)
    layer.length = n
    layer.track_scores = True
    return layer


def test_recon_stats_scores_only_the_chunk_against_sinks_chunk_and_reconstruction():
    """KVzip's local softmax: the chunk's entries get the max over reconstruction queries of a
    softmax over sinks + chunk + reconstruction keys; older entries keep their scores."""
    torch.manual_seed(1)
    n_ctx, n_chunk, n_rec, sinks = 30, 10, 12, 2
    layer = _layer_with(n_ctx + n_rec)
    layer.scores = torch.full((1, 2, n_ctx + n_rec), 0.25)
    q = torch.randn(1, 4, n_rec, 8)
    k_pos = torch.arange(n_ctx + n_rec).view(1, 1, -1)
    q_pos = torch.arange(n_ctx, n_ctx + n_rec)
    ReconStats(n_chunk=n_chunk, n_sink=sinks)(layer, q, layer.keys, q_pos, k_pos, None, 0.5)
    sel = list(range(sinks)) + list(range(n_ctx - n_chunk, n_ctx + n_rec))
    ref = eager_max(q, layer.keys[:, :, sel], q_pos, k_pos[..., sel], 0.5)
    chunk = slice(n_ctx - n_chunk, n_ctx)
    want = torch.maximum(ref[..., sinks : sinks + n_chunk].float(), torch.tensor(0.25))
    torch.testing.assert_close(layer.scores[..., chunk], want)
    # SnapKV reads obs: the same importance (obs held zeros before)
    torch.testing.assert_close(layer.obs[..., chunk], ref[..., sinks : sinks + n_chunk].float())
    assert torch.all(layer.scores[..., : n_ctx - n_chunk] == 0.25)  # older entries untouched


@pytest.mark.parametrize("local", [True, False])
def test_recon_stats_give_the_template_header_the_largest_score(local):
    """The chunk's first ``header`` entries (the prompt template's header, which the pass does
    not copy) score 1 in every head, whichever pass; every other entry scores as without a
    header."""
    torch.manual_seed(4)
    n_ctx, n_chunk, n_rec, sinks, header = 30, 10, 12, 2, 3
    q = torch.randn(1, 4, n_rec, 8)
    k_pos = torch.arange(n_ctx + n_rec).view(1, 1, -1)
    q_pos = torch.arange(n_ctx, n_ctx + n_rec)
    plain, marked = _layer_with(n_ctx + n_rec), _layer_with(n_ctx + n_rec)
    marked.keys, marked.values = plain.keys.clone(), plain.values.clone()
    for layer, h in ((plain, 0), (marked, header)):
        layer.scores = torch.full((1, 2, n_ctx + n_rec), 0.25)
        stats = ReconStats(n_chunk=n_chunk, n_sink=sinks, local=local, attends=local, header=h)
        if local:
            stats.attend(layer, q, layer.keys, layer.values, q_pos, k_pos, None, 0.5)
        else:
            stats(layer, q, layer.keys, q_pos, k_pos, None, 0.5)
    first = n_ctx - n_chunk
    assert torch.all(marked.scores[..., first : first + header] == 1.0)
    assert torch.all(plain.scores[..., first : first + header] < 1.0)
    torch.testing.assert_close(marked.scores[..., first + header : n_ctx], plain.scores[..., first + header : n_ctx])
    # older entries: as without a header (the whole-cache pass raises them too)
    torch.testing.assert_close(marked.scores[..., :first], plain.scores[..., :first])
    torch.testing.assert_close(marked.obs[..., first + header : n_ctx], plain.obs[..., first + header : n_ctx])


def test_attend_max_gives_the_attention_and_its_maximum_from_one_softmax():
    """Against two independent computations: the reference attention (SDPA) for the output and
    the float64 eager maximum for the statistics; per-head positions in any order and a bias,
    more queries than one block, keys after every query."""
    torch.manual_seed(5)
    hkv, g, lq, lk, d = 2, 3, 300, 420, 8
    q = torch.randn(1, hkv * g, lq, d)
    k, v = torch.randn(1, hkv, lk, d), torch.randn(1, hkv, lk, 5)
    k_pos = torch.stack([torch.randperm(lk), torch.randperm(lk)]).unsqueeze(0)
    q_pos = torch.arange(60, 60 + lq)
    bias = torch.rand(1, hkv, lk)
    out, best = attend_max(q, k, v, q_pos, k_pos, bias, 0.4)
    torch.testing.assert_close(out, attend(q, k, v, q_pos, k_pos, bias, 0.4, None), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(best, max_attention(q, k, q_pos, k_pos, bias, 0.4), atol=1e-6, rtol=1e-5)
    assert out.dtype == q.dtype and best.dtype == torch.float32


def test_local_recon_pass_attends_over_sinks_chunk_and_itself():
    """A pass that attends (the default): the layer's output is the attention over the sinks,
    the chunk and the reconstruction only, and the scores are the ones the separate
    statistics give (``attends=False``) over those same keys."""
    torch.manual_seed(2)
    n_ctx, n_chunk, n_rec, sinks = 30, 10, 12, 2
    layer = _layer_with(n_ctx + n_rec)
    other = _layer_with(n_ctx + n_rec)
    other.keys, other.values = layer.keys.clone(), layer.values.clone()
    q = torch.randn(1, 4, n_rec, 8)
    k_pos = torch.arange(n_ctx + n_rec).view(1, 1, -1)
    q_pos = torch.arange(n_ctx, n_ctx + n_rec)
    stats = ReconStats(n_chunk=n_chunk, n_sink=sinks)
    assert stats.attends
    out = stats.attend(layer, q, layer.keys, layer.values, q_pos, k_pos, None, 0.5)
    sel = list(range(sinks)) + list(range(n_ctx - n_chunk, n_ctx + n_rec))
    want = attend(q, layer.keys[:, :, sel], layer.values[:, :, sel], q_pos, k_pos[..., sel], None, 0.5, None)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out, attend(q, layer.keys, layer.values, q_pos, k_pos, None, 0.5, None))
    ReconStats(n_chunk=n_chunk, n_sink=sinks, attends=False)(other, q, other.keys, q_pos, k_pos, None, 0.5)
    torch.testing.assert_close(layer.scores, other.scores)
    torch.testing.assert_close(layer.obs, other.obs)
    with pytest.raises(ValueError):
        ReconStats(n_chunk=n_chunk, n_sink=sinks, local=False)


def test_recon_prompt_ids():
    prompt = ReconPrompt(first=(7, 8), next_head=(9,), next_tail=(5,), overlap=3)
    ctx = torch.arange(100, 120).view(1, -1)
    assert prompt.ids(ctx, 0, 4).tolist() == [[7, 8, 100, 101, 102, 103]]
    # a later chunk is introduced by the last `overlap` tokens before it
    assert prompt.ids(ctx, 10, 13).tolist() == [[9, 107, 108, 109, 5, 110, 111, 112]]
    # the template's header (`header` tokens) is not copied: the first chunk's copy starts after it
    header = ReconPrompt(first=(7, 8), next_head=(9,), next_tail=(5,), overlap=3, header=2)
    assert header.ids(ctx, 0, 4).tolist() == [[7, 8, 102, 103]]
    assert header.ids(ctx, 0, 1).tolist() == [[7, 8]]  # a chunk inside the header: the prompt alone
    assert header.ids(ctx, 10, 13).tolist() == prompt.ids(ctx, 10, 13).tolist()


def test_prefill_reconstructs_the_document_not_the_template_header(monkeypatch):
    """api.prefill puts the template's header (here the completion template's ``<bos>``)
    before the document; the first chunk's reconstruction copies the document only (a
    ``<bos>`` in the middle of the pass drew the attention after it on Gemma 3)."""
    lm = api.wrap_model(sharpen(tiny_llama(2)), IdTokenizer())
    tok = lm.tokenizer
    passes = []
    real = Engine.observe
    monkeypatch.setattr(Engine, "observe", lambda self, ids, c: (passes.append(ids[0].tolist()), real(self, ids, c))[1])
    text = "abcdefghijklmnopqrstuvwxyz0123"
    api.prefill(lm, text, method="snapkv", budget=0.5, scoring="recon", chunk_size=16)
    first, head, tail = COMPLETION.reconstruction()
    doc = tok.encode(text)
    assert COMPLETION.prefix_ids(tok) == [tok.bos_token_id]
    assert passes[0] == tok.encode(first) + doc[:15]  # the chunk's 16 tokens less the <bos>
    assert passes[1] == tok.encode(head) + doc[7:15] + tok.encode(tail) + doc[15:]


def test_scoring_marks_the_header_entries_of_the_chunks_that_hold_them():
    scoring = Scoring(name="recon", recon=ReconPrompt(first=(7,), next_head=(8,), next_tail=(9,), overlap=2, header=5))
    ctx = torch.arange(100, 140).view(1, -1)
    headers = [collector.header for s, e in ((0, 4), (4, 8), (8, 16)) for _, collector in scoring.passes(ctx, s, e)]
    assert headers == [4, 1, 0]


def test_template_reconstruction_is_asked_like_a_question():
    first, head, tail = COMPLETION.reconstruction()
    assert first == COMPLETION.question("Repeat the previous context exactly.")
    assert (head + "X" + tail) == COMPLETION.question("Repeat the part of the previous context exactly, starting withX")


def _engine(model, method="snapkv", budget="0.5", scoring=None, chunk=16, **opts):
    meth = make_method(method, **opts)
    model = api.wrap_model(model, IdTokenizer()).model  # kvcli's attention function
    return Engine(
        model, meth, parse_budget(budget) if isinstance(budget, str) else budget, chunk_size=chunk, scoring=scoring
    )


RECON = ReconPrompt(first=(11, 12, 13), next_head=(14, 15), next_tail=(16,), overlap=4)


@pytest.mark.parametrize("factory", [lambda: tiny_llama(2), tiny_gemma3])
def test_scoring_passes_leave_no_trace(factory):
    """With a budget larger than the document nothing is evicted: a run with reconstruction and
    question passes after every chunk must give exactly the logits and cache of a plain run."""
    model = sharpen(factory())
    torch.manual_seed(3)
    ids = torch.randint(3, 100, (1, 70))
    plain = _engine(model, "full", "1.0")
    want = plain.prefill(ids)
    for name in ("recon", "question", "recon+question"):
        scoring = Scoring(name=name, questions=[[20, 21, 22], [30, 31]], recon=RECON)
        eng = _engine(model, "snapkv", "1000", scoring)
        got = eng.prefill(ids)
        torch.testing.assert_close(got, want)
        assert eng.cache.seen == 70
        for a, b in zip(eng.cache.growing_layers, plain.cache.growing_layers, strict=True):
            assert a.length == b.length == 70
            torch.testing.assert_close(a.valid("keys"), b.valid("keys"))
            assert a.valid("scores") is not None and bool((a.valid("scores") > 0).any())


def test_local_pass_scores_the_first_chunk_as_the_whole_cache_pass_and_later_ones_apart():
    """Over the first chunk the cache is the chunk (no sinks before it): a local pass and
    KVzip's whole-cache pass attend over the same keys and must score alike.  From the second
    chunk on, the local pass no longer sees the older context: the first layer's scores (its
    queries and keys come before any attention) stay the same, the next layer's differ."""
    model = sharpen(tiny_llama(2))
    torch.manual_seed(4)
    ids = torch.randint(3, 100, (1, 40))  # chunks of 16, 16, 8

    def scores(local_pass: bool):
        eng = _engine(model, "snapkv", "1000", Scoring(name="recon", recon=RECON, local_pass=local_pass))
        eng.prefill(ids)
        return [layer.valid("scores").clone() for layer in eng.cache.growing_layers]

    local, whole = scores(True), scores(False)
    for a, b in zip(local, whole, strict=True):
        torch.testing.assert_close(a[..., :16], b[..., :16])
    torch.testing.assert_close(local[0], whole[0])
    assert not torch.allclose(local[1][..., 16:], whole[1][..., 16:])


@pytest.mark.parametrize("factory", [lambda: tiny_llama(2), tiny_gemma3])
@pytest.mark.parametrize("method", ["snapkv", "kvmerger"])
def test_detached_pass_equals_a_stored_and_rolled_back_one(factory, method):
    """A detached reconstruction pass (its entries attended straight from the forward, never
    stored) must score, compress and answer exactly as the same pass stored in the cache and
    rolled back; only the cache's size during the pass differs."""
    model = sharpen(factory())
    torch.manual_seed(5)
    ids = torch.randint(3, 100, (1, 56))  # chunks of 16, 16, 16, 8: compressed after each

    def run(detached: bool) -> Engine:
        eng = _engine(model, method, "0.5", Scoring(name="recon", recon=RECON, detached_pass=detached))
        eng.last = eng.prefill(ids)
        return eng

    det, stored = run(True), run(False)
    torch.testing.assert_close(det.last, stored.last, rtol=0, atol=0)
    for a, b in zip(det.cache.growing_layers, stored.cache.growing_layers, strict=True):
        assert a.length == b.length < 56
        for name in ("keys", "values", "positions", "counts", "scores", "obs"):
            if b.valid(name) is None:
                assert a.valid(name) is None
            else:
                torch.testing.assert_close(a.valid(name), b.valid(name), rtol=0, atol=0)
    # the stored pass makes the cache larger than the chunk did; the detached one leaves the
    # scored layers as they were (a sliding layer, Gemma's, still stores and rolls back)
    assert stored.stats.max_scoring_cache_bytes > stored.stats.max_cache_bytes
    assert det.stats.max_scoring_cache_bytes < stored.stats.max_scoring_cache_bytes
    if len(det.cache.growing_layers) == len(det.cache.kv_layers):
        assert det.stats.max_scoring_cache_bytes <= det.stats.max_cache_bytes
    assert all(layer.pending is None for layer in det.cache.growing_layers)


def test_pod_runs_its_passes_stored():
    """PoD members read their anchor's keys, so anchor and member must hold the same entries:
    a cache with members is not detachable and its passes are stored and rolled back."""
    model = sharpen(tiny_llama(4))
    eng = _engine(model, "pod+snapkv", "0.5", Scoring(name="recon", recon=RECON))
    assert not eng.cache.detachable
    seen = []
    real = eng.forward
    eng.forward = lambda ids, collector=None: (seen.append(eng.cache.clock.detached), real(ids, collector))[1]
    eng.prefill(torch.randint(3, 100, (1, 40)))  # 3 chunks, each followed by its pass
    assert len(seen) == 6 and not any(seen)
    plain = _engine(model, "snapkv", "0.5", Scoring(name="recon", recon=RECON))
    assert plain.cache.detachable


def test_recon_scoring_runs_one_pass_per_chunk_and_window_none():
    model = sharpen(tiny_llama(2))
    calls = []
    eng = _engine(model, scoring=Scoring(name="recon", recon=RECON))
    real = eng.observe
    eng.observe = lambda ids, collector: (calls.append((ids.shape[1], type(collector).__name__)), real(ids, collector))
    eng.prefill(torch.randint(3, 100, (1, 40)))  # chunks of 16, 16, 8
    assert calls == [(3 + 16, "ReconStats"), (2 + 4 + 1 + 16, "ReconStats"), (2 + 4 + 1 + 8, "ReconStats")]
    window = _engine(model, scoring=Scoring(name="window"))
    window.observe = lambda *a: pytest.fail("window scoring runs no extra pass")
    window.prefill(torch.randint(3, 100, (1, 40)))


def test_question_scoring_keeps_the_largest_attention_of_several_questions():
    model = sharpen(tiny_llama(2))
    ids = torch.randint(3, 100, (1, 16))  # one chunk: compression does not run below budget
    q1, q2 = [20, 21, 22], [40, 41]

    def obs(questions):
        eng = _engine(model, "snapkv", "1000", Scoring(name="question", questions=questions))
        eng.prefill(ids)
        return [layer.valid("obs").clone() for layer in eng.cache.growing_layers]

    both, one, two = obs([q1, q2]), obs([q1]), obs([q2])
    for b, x, y in zip(both, one, two, strict=True):
        torch.testing.assert_close(b, torch.maximum(x, y))


def test_global_targets_exact_total_floor_and_ranking():
    imp = [torch.full((1, 2, 50), 0.1), torch.full((1, 2, 50), 0.9), torch.rand(1, 2, 50) * 0.5]
    imp[0][..., :5] = 1.0  # a few entries of layer 0 matter
    out = global_targets(imp, target=25, floor=8)
    assert sum(out) == 75  # exactly layers x target
    assert out[1] == 50  # every entry of the layer whose entries matter most
    assert out[0] >= 8 and out[2] >= 8  # floors
    assert global_targets([torch.rand(1, 1, 10)] * 2, target=20, floor=1) == [10, 10]  # within budget


def test_heads_share_gives_a_layer_its_neediest_heads_count():
    imp = [torch.full((1, 3, 40), 0.1), torch.full((1, 3, 40), 0.2), torch.full((1, 3, 40), 0.3)]
    imp[0][:, 0] = 1.0  # one head of layer 0 needs all its entries; its other heads none
    mean = global_targets(imp, target=20, floor=4)
    most = global_targets(imp, target=20, floor=4, allocation="heads")
    assert sum(mean) == sum(most) == 60  # both exact: layers x target
    assert most[0] == 40 and mean[0] < 40  # max: the neediest head decides the layer's count
    assert min(most) >= 4  # floors hold
    # within budget: everything kept
    assert global_targets([torch.rand(1, 2, 10)] * 2, target=20, floor=1, allocation="heads") == [10, 10]


def test_relative_share_ranks_scores_against_their_heads_mean():
    # Layer 0 attends diffusely (small scores) but picks out 10 entries; layer 1's scores are
    # all large (a head copying the context) with no peaks.
    diffuse = torch.full((1, 1, 40), 0.01)
    diffuse[..., 10:20] = 0.2
    copying = torch.full((1, 1, 40), 0.5)
    copying[..., ::2] = 0.6
    raw = global_targets([diffuse, copying], target=20, floor=2, allocation="heads")
    rel = global_targets([diffuse, copying], target=20, floor=2, allocation="relative")
    assert raw == [2, 38]  # ranked raw, the diffuse layer keeps only its floor
    # divided by the means (0.0575 and 0.55): layer 0's 10 peaks (3.48) outrank all of layer 1
    # (1.09 and 0.91), whose 40 entries outrank layer 0's others (0.17): 10 + 30 make the 40
    assert rel == [10, 30]
    # a layer's scores scaled by a constant leave the relative allocation as it was
    scaled = global_targets([diffuse * 30, copying], target=20, floor=2, allocation="relative")
    assert scaled == rel and global_targets([diffuse * 30, copying], target=20, floor=2, allocation="heads") != raw
    # a head whose scores are all zero neither divides by zero nor wins anything but its floor
    zero = global_targets([torch.zeros(1, 1, 40), copying], target=20, floor=2, allocation="relative")
    assert zero == [2, 38]


def test_relative_divides_by_the_mean_of_all_a_head_has_ranked():
    # Chunk after chunk a layer keeps its best entries, so the mean of what it holds rises;
    # relative divides by the mean over every entry it ranked, evicted ones included.
    scores = torch.full((1, 1, 40), 0.01)
    scores[..., :5] = 1.0
    scores[..., 5:10] = 0.8  # mean (5 + 4 + 0.3) / 40 = 0.2325
    ranked = Ranked()
    assert torch.allclose(ranked.means([7], [scores])[0], scores.mean(dim=-1, keepdim=True))
    held = scores[..., :10]  # the 30 entries of 0.01 evicted
    ranked.evicted(7, scores, held)
    assert ranked.counts == {7: 30}
    # the mean over all 40 ranked, not the held ones' (0.9)
    assert ranked.means([7], [held])[0].item() == pytest.approx(0.2325)
    assert ranked.means([3], [held])[0].item() == pytest.approx(0.9)  # another layer: no history
    # The allocation divides by the means it is given.  Divided by the held mean, the layer's
    # entries (1.11, 0.89) interleave with a flat layer's (1.09, 0.91) and it keeps 6 of 10;
    # divided by the mean of all it ranked (4.3, 3.44) it keeps all 10.
    flat = torch.full((1, 1, 10), 0.5)
    flat[..., ::2] = 0.6
    own = global_targets([held, flat], target=8, floor=1, allocation="relative")
    given = global_targets(
        [held, flat], target=8, floor=1, allocation="relative", means=ranked.means([7, 8], [held, flat])
    )
    assert own == [6, 10] and given == [10, 6]


def test_relative_history_through_the_engine():
    """The engine's compressions record what each layer evicted, for that cache only."""
    model = sharpen(tiny_llama(2, layers=3))
    tokens = torch.randint(3, 100, (1, 96))
    eng = _engine(model, "snapkv", Budget(ratio=0.5, allocation="relative"), Scoring(name="recon", recon=RECON))
    eng.prefill(tokens)
    ranked = eng.method._ranked[eng.cache]
    layers = eng.cache.growing_layers
    assert sum(layer.length for layer in layers) == 3 * 48
    # every token a layer has seen is either held or counted as evicted
    assert {layer.layer_idx: layer.length + ranked.counts.get(layer.layer_idx, 0) for layer in layers} == {
        layer.layer_idx: 96 for layer in layers
    }
    assert all(bool((ranked.sums[k] >= 0).all()) for k in ranked.sums)
    other = _engine(model, "snapkv", Budget(ratio=0.5, allocation="heads"), Scoring(name="recon", recon=RECON))
    other.prefill(tokens)
    assert other.cache not in other.method._ranked  # heads: no history kept


def test_global_allocation_through_the_engine():
    model = sharpen(tiny_llama(2, layers=3))
    tokens = torch.randint(3, 100, (1, 96))
    for allocation in ("global", "heads", "relative"):
        eng = _engine(model, "h2o", Budget(ratio=0.5, allocation=allocation), Scoring(name="recon", recon=RECON))
        eng.prefill(tokens)
        lengths = [layer.length for layer in eng.cache.growing_layers]
        assert sum(lengths) == 3 * 48, allocation
        assert [int(layer.key_positions().shape[-1]) for layer in eng.cache.growing_layers] == lengths
    # streaming ranks nothing: it shares the budget uniformly (and says so in its budget)
    streaming = _engine(model, "streaming", Budget(ratio=0.5, allocation="global"))
    assert streaming.budget.allocation == "uniform" and str(streaming.budget) == "0.5:uniform"
    streaming.prefill(torch.randint(3, 100, (1, 96)))
    assert [layer.length for layer in streaming.cache.growing_layers] == [48, 48, 48]
    with pytest.raises(KvcliError, match="allocation"):
        Budget(ratio=0.5, allocation="sideways")


def test_question_scoring_alone_shares_the_budget_uniformly():
    """Question scores are not comparable across layers (measured: heads collapses on SmolLM2),
    so the engine runs them uniform, and says so; with reconstruction the ranking stays."""
    model = sharpen(tiny_llama(2, layers=3))
    ids = torch.randint(3, 100, (1, 96))
    question = Scoring(name="question", questions=[[20, 21, 22]])
    for allocation in ("heads", "global", "auto"):
        eng = _engine(model, "snapkv", Budget(ratio=0.5, allocation=allocation), question)
        assert str(eng.budget) == "0.5:uniform"
        eng.prefill(ids)
        assert [layer.length for layer in eng.cache.growing_layers] == [48, 48, 48]
    both = Scoring(name="recon+question", questions=[[20, 21, 22]], recon=RECON)
    assert _engine(model, "snapkv", Budget(ratio=0.5, allocation="heads"), both).budget.allocation == "heads"
    recon = Scoring(name="recon", recon=RECON)
    assert _engine(model, "snapkv", Budget(ratio=0.5, allocation="global"), recon).budget.allocation == "global"
    # "auto" (the default) runs each method's own allocation, and the engine's budget says which
    auto = Budget(ratio=0.5)
    assert auto.allocation == "auto"
    assert str(_engine(model, "snapkv", auto, recon).budget) == "0.5:relative"
    assert str(_engine(model, "kvmerger", auto, recon).budget) == "0.5:heads"
    assert str(_engine(model, "streaming", auto).budget) == "0.5:uniform"


def test_scoring_names_and_auto():
    assert api.resolve_scoring("auto", has_questions=True) == "recon"  # measured (docs/scoring.md)
    assert api.resolve_scoring("auto", has_questions=False) == "recon"
    with pytest.raises(KvcliError, match="needs the questions"):
        api.resolve_scoring("question", has_questions=False)
    with pytest.raises(KvcliError, match="unknown"):
        api.resolve_scoring("psychic", has_questions=False)


def test_prefill_reports_scoring():
    lm = api.wrap_model(sharpen(tiny_llama(2)), IdTokenizer())
    ctx = api.prefill(lm, "some words " * 20, method="snapkv", budget=0.5, chunk_size=32)
    assert ctx.report().scoring == "recon"
    ctx = api.prefill(lm, "some words " * 20, method="snapkv", budget=0.5, chunk_size=32, questions=["why?"])
    assert ctx.report().scoring == "recon"  # auto: reconstruction even with the questions (measured)
    ctx = api.prefill(
        lm, "some words " * 20, method="snapkv", budget=0.5, chunk_size=32, questions=["why?"], scoring="question"
    )
    assert ctx.report().scoring == "question"
    assert api.prefill(lm, "some words " * 20, method="streaming", budget=0.5).report().scoring is None


def test_budget_text_carries_the_allocation():
    from kvcli.api.settings import load_preset, resolve_settings
    from kvcli.core import defaults
    from kvcli.core.budget import parse_budget

    # one default for the library and the command line (measured: docs/scoring.md)
    assert parse_budget("0.5") == Budget(ratio=0.5) == Budget(ratio=0.5, allocation=defaults.ALLOCATION)
    assert defaults.ALLOCATION == "auto"  # each method's own, measured (docs/scoring.md)
    # the text always names the allocation, so it parses back to the same budget
    for text in ("0.5:uniform", "0.35:heads", "0.5:global", "300:uniform", "0.35:relative"):
        assert str(parse_budget(text)) == text and parse_budget(str(parse_budget(text))) == parse_budget(text)
    assert parse_budget("0.5:global") == Budget(ratio=0.5, allocation="global")
    assert str(parse_budget("40:global")) == "40:global" and str(parse_budget("1:global")) == "1"
    assert parse_budget(str(parse_budget("0.35", "global"))) == Budget(ratio=0.35, allocation="global")
    with pytest.raises(KvcliError, match="allocation"):
        parse_budget("0.5:sideways")
    # the command line's default (measured: docs/scoring.md) for methods that rank entries only
    # "auto" becomes the method's own allocation (measured: docs/scoring.md, "relative")
    assert resolve_settings(method="snapkv", budget="0.5").budget.allocation == "relative"
    assert resolve_settings(method="kvmerger", budget="0.5").budget.allocation == "heads"
    assert resolve_settings(method="h2o", budget="0.5").budget.allocation == "heads"
    assert resolve_settings(method="kvmerger", budget="0.5", allocation="relative").budget.allocation == "relative"
    assert resolve_settings(method="snapkv", budget="0.5:uniform").budget.allocation == "uniform"
    assert resolve_settings(method="streaming", budget="0.5").budget.allocation == "uniform"
    assert load_preset("balanced").budget.allocation == "relative"  # snapkv's own
    assert load_preset("streaming").budget.allocation == "uniform"
