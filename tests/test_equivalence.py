"""With no compression, chunked prefill + greedy decode must give exactly what
``model.generate()`` gives (an independent reference)."""

import copy

import pytest
import torch

from kvcli import api
from kvcli.methods import method_names

from conftest import IdTokenizer


def reference_tokens(model, prompt: torch.Tensor, n: int) -> list[int]:
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, prompt.shape[1] :].tolist()


def kvcli_tokens(model, prompt, n, chunk, method="full"):
    lm = api.wrap_model(copy.deepcopy(model), IdTokenizer())
    ctx = api.prefill(lm, prompt[0], method=method, budget=1.0, chunk_size=chunk, raw=True)
    ctx._eos = lambda: set()  # generate() above ignores EOS through min_new_tokens
    return ctx.generate_ids(None, n)


@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 200])
def test_chunked_prefill_matches_generate(tiny_model, chunk):
    name, model = tiny_model
    torch.manual_seed(1)
    prompt = torch.randint(3, 128, (1, 61))
    assert kvcli_tokens(model, prompt, 12, chunk) == reference_tokens(model, prompt, 12)


@pytest.mark.parametrize("method", method_names())
def test_every_method_at_full_budget_matches_generate(tiny_model, method):
    name, model = tiny_model
    torch.manual_seed(2)
    prompt = torch.randint(3, 128, (1, 45))
    assert kvcli_tokens(model, prompt, 10, 16, method) == reference_tokens(model, prompt, 10)
