"""``Context.answer_logprob`` (the eval's log-likelihood of the reference answer) against
independent references: the model's own forward over the whole sequence with the full
cache, and token-by-token teacher forcing over a compressed cache."""

import copy

import pytest
import torch

from kvcli import api

from conftest import IdTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTION, ANSWER = "Which?", "the 42nd"


def _context(model, chunk, method="full", budget=1.0, **kw):
    lm = api.wrap_model(copy.deepcopy(model), IdTokenizer())
    torch.manual_seed(5)
    ids = torch.randint(3, 128, (70,))
    return ids, api.prefill(lm, ids, method=method, budget=budget, chunk_size=chunk, raw=True, **kw)


def _suffix(ctx):
    prompt = torch.tensor(ctx.tokenizer.encode(ctx.template.question(QUESTION)))
    target = torch.tensor(ctx.tokenizer.encode(" " + ANSWER))
    return prompt, target


@pytest.mark.parametrize("chunk", [3, 16, 200])  # 3: the question and answer span several forwards
def test_full_cache_equals_the_models_own_forward(tiny_model, chunk):
    name, model = tiny_model
    ids, ctx = _context(model, chunk)
    prompt, target = _suffix(ctx)
    whole = torch.cat([ids, prompt, target]).view(1, -1)
    with torch.no_grad():
        logits = model(whole).logits[0].float()
    first = ids.numel() + prompt.numel()  # position of the answer's first token
    logp = torch.log_softmax(logits[first - 1 : -1], dim=-1)
    expected = float(logp.gather(-1, target.view(-1, 1)).mean())
    assert ctx.answer_logprob(QUESTION, ANSWER) == pytest.approx(expected, abs=1e-4)


def _token_by_token(ctx) -> float:
    """The per-token loop answer_logprob replaced: one forward per answer token."""
    prompt, target = _suffix(ctx)
    engine = ctx.engine
    mark = engine.cache.checkpoint()
    try:
        logits = engine.forward(prompt.view(1, -1))
        total = 0.0
        for tok in target.tolist():
            total += float(torch.log_softmax(logits.float(), dim=-1)[tok])
            logits = engine.forward(torch.tensor([[tok]]))
    finally:
        engine.cache.rollback(mark)
    return total / target.numel()


@pytest.mark.parametrize("method", ["snapkv", "kvmerger", "h2o"])
def test_compressed_cache_equals_token_by_token_and_is_left_as_it_was(tiny_model, method):
    name, model = tiny_model
    ids, ctx = _context(model, 16, method, 0.5, scoring="recon")
    before = ctx.engine.cache.nbytes(), ctx.engine.cache.seen
    reference = _token_by_token(ctx)
    got = ctx.answer_logprob(QUESTION, ANSWER)
    assert got == pytest.approx(reference, abs=1e-4)
    assert (ctx.engine.cache.nbytes(), ctx.engine.cache.seen) == before
    # the cache is left as it was: asking again gives the same number
    assert ctx.answer_logprob(QUESTION, ANSWER) == got
