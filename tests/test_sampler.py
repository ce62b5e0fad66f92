"""The decode sampler's repetition guards: what they ban and penalize, and that off means off."""

import pytest
import torch

from kvcli.core.errors import KvcliError
from kvcli.engine.sampler import Sampler, banned_by_ngrams


def test_ngram_ban_finds_every_earlier_continuation():
    h = torch.tensor([5, 6, 7, 5, 6, 8, 5, 6])
    # the last two tokens (5, 6) were followed by 7 and by 8: both would repeat a trigram
    assert sorted(banned_by_ngrams(h, 3).tolist()) == [7, 8]
    # bigrams: 6 followed 5 twice, only after the last token (6) were 7 and 8 seen
    assert sorted(banned_by_ngrams(h, 2).tolist()) == [7, 8]
    assert sorted(set(banned_by_ngrams(h, 1).tolist())) == [5, 6, 7, 8]  # unigrams: everything seen
    assert banned_by_ngrams(h, 4).numel() == 0  # "8 5 6" never occurred before
    assert banned_by_ngrams(torch.tensor([1, 2]), 3).numel() == 0  # shorter than n: nothing to repeat


def test_ngram_ban_four():
    h = torch.tensor([1, 2, 3, 4, 9, 2, 3])
    assert banned_by_ngrams(h, 3).tolist() == [4]  # "2 3" was followed by 4
    assert banned_by_ngrams(h, 4).numel() == 0  # "9 2 3" never occurred before


def test_greedy_blocks_a_repeated_ngram():
    logits = torch.tensor([0.0, 1.0, 5.0, 2.0])  # greedy picks 2
    history = [2, 1, 2]  # the last token, 2, was followed by 1 before: only 1 is banned
    assert Sampler()(logits, history) == 2  # guards off: history is ignored
    assert Sampler(no_repeat_ngram=2)(logits, [2, 2]) == 3  # "2 2" again is banned, next best is 3
    assert Sampler(no_repeat_ngram=2)(logits, history) == 2  # "2 2" never happened: allowed


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    s = Sampler(repetition_penalty=2.0)
    logits = torch.tensor([4.0, -1.0, 3.0, 0.5])
    out = s.adjust(logits, [0, 1, 0])
    assert out.tolist() == [2.0, -2.0, 3.0, 0.5]
    assert logits.tolist() == [4.0, -1.0, 3.0, 0.5]  # the input is not modified
    assert s(logits, [0]) == 2  # 4 / 2 < 3
    assert Sampler()(logits, [0]) == 0


def test_guards_with_sampling_never_pick_a_banned_token():
    s = Sampler(temperature=1.0, seed=0, no_repeat_ngram=1)
    logits = torch.zeros(6)
    picks = {s(logits, [0, 1, 2]) for _ in range(50)}
    assert picks <= {3, 4, 5} and len(picks) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"repetition_penalty": 0.5}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"no_repeat_ngram": -1}, "no_repeat_ngram"),
        ({"no_repeat_ngram": 2.5}, "no_repeat_ngram"),
    ],
)
def test_bad_guard_values_are_one_line_errors(kwargs, match):
    with pytest.raises(KvcliError, match=match) as exc:
        Sampler(**kwargs)
    assert exc.value.option == match


def test_engine_passes_the_generated_tokens(models_for_sampler):
    """End to end through Engine.generate: with unigram blocking no token repeats."""
    from kvcli import api

    ctx = api.prefill(models_for_sampler, torch.arange(3, 40), method="full", raw=True)

    def generate(sampler: Sampler) -> list[int]:  # 40 tokens, EOS or not
        mark = ctx.engine.cache.checkpoint()
        try:
            return list(ctx.engine.generate(ctx.engine.context_logits(), 40, sampler, eos_ids=set()))
        finally:
            ctx.engine.cache.rollback(mark)

    plain, guarded = generate(Sampler()), generate(Sampler(no_repeat_ngram=1))
    assert len(guarded) == len(plain) == 40
    assert len(set(guarded)) == 40
    assert len(set(plain)) < 40  # the tiny random model does repeat itself


@pytest.fixture(scope="module")
def models_for_sampler():
    from kvcli import api

    from conftest import IdTokenizer, tiny_llama

    torch.manual_seed(0)
    return api.wrap_model(tiny_llama(2), IdTokenizer())


# ---- summaries: the guards by default, and a note when the cap cut one off --------------------
def _no_eos(monkeypatch):
    """Make every decode run to its cap: end of text (id 2) is never chosen."""
    adjust = Sampler.adjust

    def without_eos(self, logits, history):
        out = adjust(self, logits, history).clone()
        out[2] = float("-inf")
        return out

    monkeypatch.setattr(Sampler, "adjust", without_eos)


def test_summary_is_capped_and_guarded_by_default(models_for_sampler, monkeypatch):
    from kvcli import api
    from kvcli.api.context import summary_sampler
    from kvcli.core import defaults

    _no_eos(monkeypatch)
    ctx = api.prefill(models_for_sampler, "some document text", method="full")
    summary = ctx.summarize(max_new_tokens=5)
    assert summary.capped and len(summary.tokens) == 5
    distinct = ctx.summarize(max_new_tokens=30, sampler=Sampler(no_repeat_ngram=1)).tokens
    assert len(distinct) == 30 == len(set(distinct))  # a given sampler is used as it is
    s = summary_sampler()
    assert (s.repetition_penalty, s.no_repeat_ngram) == (
        defaults.SUMMARY_REPETITION_PENALTY,
        defaults.SUMMARY_NO_REPEAT_NGRAM,
    )
    answer = ctx.ask("what?", max_new_tokens=3)
    assert answer.capped and len(answer.tokens) == 3


def test_cli_summarize_says_when_the_cap_cut_it_off(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvcli.cli.app import app

    from conftest import WORDS, save_word_llama

    _no_eos(monkeypatch)
    model = save_word_llama(tmp_path / "model")
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(WORDS * 3))
    run = CliRunner().invoke(app, ["summarize", str(doc), "--model", str(model), "--max-new-tokens", "4"])
    assert run.exit_code == 0, run.output
    assert "summary stopped at the 4-token cap; use --max-new-tokens" in " ".join(run.stderr.split())
    bad = CliRunner().invoke(app, ["summarize", str(doc), "--model", str(model), "--repetition-penalty", "0.5"])
    assert bad.exit_code != 0 and "--repetition-penalty" in str(bad.exception)
