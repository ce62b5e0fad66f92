"""Synthetic evaluation tasks, fillers and scoring, with a small BPE tokenizer built here."""

from __future__ import annotations

import itertools
import random
import re
import time
from collections import Counter
from itertools import pairwise

import pytest

from kvcli.core.errors import KvcliError
from kvcli.eval.fillers import STYLES, filler_sentences
from kvcli.eval.scoring import contains_answer, load_questions, score, score_answers
from kvcli.eval.tasks import KINDS, NEEDLE, Task, generate_suite, generate_task


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer trained in-process (no downloads): digits and unseen
    words split into several tokens, spaces attach to the next word, as in real models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = []
    for style in STYLES:
        stream = filler_sentences(style, rng)
        corpus += [" ".join(itertools.islice(stream, 20)) for _ in range(40)]
    corpus += [NEEDLE.format(key="brave-lantern", value=rng.randint(10**6, 10**7 - 1)) for _ in range(50)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw)


def ntok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------- tasks
def test_deterministic_and_seed_dependent(tok):
    for kind in KINDS:
        a = generate_task(kind, tok, 600, seed=5)
        b = generate_task(kind, tok, 600, seed=5)
        c = generate_task(kind, tok, 600, seed=6)
        assert a == b, kind
        assert a.context != c.context and a.answers != c.answers, kind


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_respected(tok, kind):
    for length in (300, 2000, 8000):
        task = generate_task(kind, tok, length, seed=length)
        n = ntok(tok, task.context)
        assert n == task.length and task.target_length == length
        assert n <= length and length - n <= min(16, 0.02 * length), (kind, length, n)


def test_long_context_is_fast(tok):
    start = time.perf_counter()
    task = generate_task("niah_single", tok, 16000, seed=1, filler="prose")
    assert time.perf_counter() - start < 3.0
    assert 16000 - 16 <= task.length <= 16000


def test_task_fields_and_needles(tok):
    t = generate_task("niah_single", tok, 1000, seed=3)
    key = re.search(r"number for (\S+) mentioned", t.question).group(1)
    assert re.fullmatch(r"[a-z]+-[a-z]+", key)
    assert t.context.count(NEEDLE.format(key=key, value=t.answers[0])) == 1
    assert re.fullmatch(r"\d{7}", t.answers[0]) and t.metric == "any"
    assert t.answer_prefix.startswith(f"The special magic number for {key}")
    assert t.filler in STYLES and 0.0 <= t.depth <= 1.0

    mk = generate_task("niah_multikey", tok, 1000, seed=3)
    assert mk.context.count("The special magic number for") == 4 and len(mk.answers) == 1
    key = re.search(r"number for (\S+) mentioned", mk.question).group(1)
    assert NEEDLE.format(key=key, value=mk.answers[0]) in mk.context

    mv = generate_task("niah_multivalue", tok, 1000, seed=3)
    key = re.search(r"numbers for (\S+) mentioned", mv.question).group(1)
    assert len(set(mv.answers)) == 4 and mv.metric == "all"
    assert all(NEEDLE.format(key=key, value=v) in mv.context for v in mv.answers)

    mq = generate_task("niah_multiquery", tok, 1000, seed=3)
    keys = re.findall(r"[a-z]+-[a-z]+", mq.question)
    assert len(set(keys)) == 4 and mq.metric == "all"
    assert all(NEEDLE.format(key=k, value=v) in mq.context for k, v in zip(keys, mq.answers, strict=True))

    vt = generate_task("vt", tok, 1000, seed=3)
    value = re.search(r"value (\d{5}) ", vt.question).group(1)
    names = vt.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    positions = [vt.context.index(s) for s in chain]
    assert positions == sorted(positions) and vt.context.count("VAR ") == 9

    fwe = generate_task("fwe", tok, 1000, seed=3)
    counts = Counter(fwe.context.split())
    top = [w for w, _ in counts.most_common(3)]
    assert sorted(top) == sorted(fwe.answers) and fwe.depth is None and fwe.filler == "words"
    assert min(counts[w] for w in top) > counts.most_common(4)[3][1]


def test_depth_places_needle(tok):
    positions = {}
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        t = generate_task("niah_single", tok, 2000, seed=11, depth=depth, filler="report")
        needle = NEEDLE.format(key=re.search(r"for (\S+) mentioned", t.question).group(1), value=t.answers[0])
        pos = t.context.index(needle)
        positions[depth] = pos
        frac = ntok(tok, t.context[:pos]) / t.length
        assert abs(frac - depth) < 0.05, (depth, frac)
        # at a sentence boundary
        assert pos == 0 or t.context[pos - 2 : pos] == ". "
    assert positions[0.0] == 0 and positions[0.1] < positions[0.5] < positions[0.9]
    # a given depth changes nothing but the needle position
    a = generate_task("niah_single", tok, 2000, seed=11, depth=0.1, filler="report")
    b = generate_task("niah_single", tok, 2000, seed=11, depth=0.9, filler="report")
    assert a.answers == b.answers and a.question == b.question


def test_suite(tok):
    suite = generate_suite(["niah_single", "vt"], [400, 800], samples=3, seed=1, tokenizer=tok)
    assert len(suite) == 12 and all(isinstance(t, Task) for t in suite)
    single = [t for t in suite if t.kind == "niah_single" and t.target_length == 400]
    assert [t.depth for t in single] == [0.1, 0.3, 0.5]
    assert len({t.seed for t in single}) == 3
    # sample i plants the same needle at every length
    long = [t for t in suite if t.kind == "niah_single" and t.target_length == 800]
    assert [t.answers for t in single] == [t.answers for t in long]
    again = generate_suite(["niah_single", "vt"], [400, 800], samples=3, seed=1, tokenizer=tok)
    assert again == suite


def test_errors(tok):
    with pytest.raises(KvcliError, match="unknown task kind"):
        generate_task("nope", tok, 1000, seed=0)
    with pytest.raises(KvcliError, match=r"too small.*minimum is \d+ tokens"):
        generate_task("niah_multikey", tok, 50, seed=0)
    with pytest.raises(KvcliError, match="filler"):
        generate_task("niah_single", tok, 1000, seed=0, filler="poetry")
    with pytest.raises(KvcliError, match="depth"):
        generate_task("niah_single", tok, 1000, seed=0, depth=1.5)
    with pytest.raises(KvcliError, match="unknown task kind"):
        generate_suite(["x"], [1000], 1, 0, tok)


# --------------------------------------------------------------------- fillers
def test_fillers_vary_and_are_safe():
    texts = {}
    for style in STYLES:
        for seed in (1, 2):
            stream = filler_sentences(style, random.Random(seed))
            sents = list(itertools.islice(stream, 3000))
            text = " ".join(sents)
            assert not re.search(r"\d{5,}", text), style
            assert "magic" not in text.lower() and "VAR" not in text
            assert all(s.endswith((".", "!", "?")) for s in sents)
            texts[style, seed] = text
    assert len(set(texts.values())) >= 5  # noise may only differ by its starting sentence
    assert texts["prose", 1][:2000] != texts["prose", 2][:2000]
    assert texts["report", 1][:2000] != texts["report", 2][:2000]
    prose = set(re.findall(r"[^.]+\.", texts["prose", 1]))
    assert len(prose) > 1000  # not a handful of sentences repeated
    with pytest.raises(KvcliError, match="filler style"):
        filler_sentences("poetry", random.Random(0))


def test_default_filler_varies_across_seeds(tok):
    styles = {generate_task("niah_single", tok, 300, seed=s).filler for s in range(12)}
    assert styles == set(STYLES)


# --------------------------------------------------------------------- scoring
def _task(answers, metric):
    return Task(
        kind="niah_single",
        context="",
        question="",
        answers=answers,
        answer_prefix="",
        length=0,
        target_length=0,
        depth=None,
        seed=0,
        filler="noise",
        metric=metric,
    )


def test_score():
    one = _task(["1234567"], "any")
    assert score(one, " 1234567.") == 1.0
    assert score(one, "It is 7654321") == 0.0
    assert score(one, "12345678") == 0.0 and score(one, "01234567") == 0.0
    assert score(one, "x1234567") == 0.0 and score(one, "(1234567)") == 1.0
    multi = _task(["1111111", "2222222", "3333333", "4444444"], "all")
    assert score(multi, "1111111, 2222222, 3333333 and 4444444") == 1.0
    assert score(multi, "1111111 and 3333333") == 0.5
    assert score(multi, "none") == 0.0
    anyt = _task(["Paris", "City of Light"], "any")
    assert score(anyt, "it is  the CITY   of\nlight") == 1.0
    words = _task(["zelu", "beni", "kiri"], "all")
    assert score(words, "ZELU, beni, kirifo") == pytest.approx(2 / 3)
    assert contains_answer("VAR ABCDE", "abcde") and not contains_answer("ABCDEF", "ABCDE")
    with pytest.raises(KvcliError):
        score_answers(["a"], "most", "a")


def test_generated_task_scores(tok):
    for kind in KINDS:
        t = generate_task(kind, tok, 500, seed=9)
        assert score(t, " ".join(t.answers)) == 1.0
        assert score(t, "I do not know 0000000") == 0.0


def test_load_questions(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        '{"question": "Who?", "answer": "Ann"}\n\n'
        '{"question": "When?", "answers": ["1999", 2000], "metric": "all", "id": 7}\n'
    )
    qs = load_questions(p)
    assert qs[0] == {"question": "Who?", "answers": ["Ann"], "metric": "any"}
    assert qs[1]["answers"] == ["1999", "2000"] and qs[1]["metric"] == "all" and qs[1]["id"] == 7

    bad = {
        '{"question": "a", "answer": "b"}\n{"question": "x"': r"line 2: invalid JSON",
        '["a"]': r"line 1: expected a JSON object",
        '{"answer": "b"}': r'line 1: "question"',
        '{"question": "a"}': r'line 1: missing "answer"',
        '{"question": "a", "answers": []}': r"line 1: .*non-empty list",
        '{"question": "a", "answer": "b", "answers": ["c"]}': r"line 1: give either",
        '{"question": "a", "answers": [null]}': r"line 1: answers must be",
        '{"question": "a", "answer": "b", "metric": "most"}': r'line 1: "metric"',
        "\n\n": r"no questions",
    }
    for content, message in bad.items():
        p.write_text(content)
        with pytest.raises(KvcliError, match=message) as err:
            load_questions(p)
        assert "\n" not in str(err.value)
    with pytest.raises(KvcliError, match="cannot read"):
        load_questions(tmp_path / "missing.jsonl")
