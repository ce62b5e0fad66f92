"""Synthetic long-context tasks in the style of RULER, generated offline and seeded.

Each task is a context of (almost exactly) a requested number of tokens, a question and
the reference answers, so the quality cost of KV-cache compression can be measured on
any length without downloads. Kinds:

* ``niah_single``     - one "special magic number" needle at a chosen depth;
* ``niah_multikey``   - the real needle among three needles with other keys;
* ``niah_multivalue`` - four needles with the same key; all four values are wanted;
* ``niah_multiquery`` - four needles with different keys; all four values are wanted;
* ``vt``              - variable tracking: a chain of four assignment hops;
* ``fwe``             - frequent-word extraction from a Zipf-distributed word stream.

Determinism: a task depends only on (kind, length, seed, depth, filler) and the
tokenizer. Keys, values and the default depth / filler style come from the seed alone,
so one seed plants the same needle at every length.
"""

from __future__ import annotations

import bisect
import math
import random
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ..core.errors import KvcliError
from .fillers import PADS, STYLES, filler_sentences

KINDS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fwe")

#: Smallest context (tokens) a task kind may be asked for.
MIN_LENGTH = {
    "niah_single": 128,
    "niah_multikey": 256,
    "niah_multivalue": 256,
    "niah_multiquery": 256,
    "vt": 256,
    "fwe": 256,
}

NEEDLE = "The special magic number for {key} is: {value}."
_N_NEEDLES = 4  # multikey: 1 real + 3 distractors; multivalue / multiquery: 4 needles
_VT_HOPS = 4
_FWE_TOP = 3
_FWE_ALPHA = 1.5

_ADJECTIVES = (
    "brave",
    "quiet",
    "amber",
    "hollow",
    "swift",
    "gentle",
    "silver",
    "crooked",
    "bright",
    "distant",
    "frozen",
    "golden",
    "hidden",
    "lucky",
    "mellow",
    "narrow",
    "patient",
    "rapid",
    "rustic",
    "scarlet",
    "shy",
    "sleepy",
    "solemn",
    "stormy",
    "sunny",
    "tidy",
    "velvet",
    "wandering",
    "wild",
    "wooden",
    "young",
    "zesty",
    "bold",
    "calm",
    "clever",
    "dusty",
    "eager",
    "fierce",
    "glassy",
    "humble",
    "icy",
    "jolly",
    "kind",
    "lofty",
    "misty",
    "noble",
    "odd",
    "proud",
    "rosy",
    "sturdy",
)
_NOUNS = (
    "lantern",
    "harbor",
    "falcon",
    "meadow",
    "anchor",
    "bramble",
    "canyon",
    "compass",
    "cottage",
    "dragon",
    "ember",
    "feather",
    "glacier",
    "hammer",
    "island",
    "jasmine",
    "kettle",
    "ladder",
    "marble",
    "needle",
    "orchard",
    "pebble",
    "quarry",
    "ribbon",
    "saddle",
    "thimble",
    "umbrella",
    "violin",
    "walnut",
    "willow",
    "beacon",
    "cobble",
    "dune",
    "fern",
    "garnet",
    "heron",
    "ivy",
    "juniper",
    "kite",
    "lagoon",
    "mitten",
    "nutmeg",
    "otter",
    "pepper",
    "raven",
    "spindle",
    "tulip",
    "vessel",
    "wren",
    "yarrow",
)
_SYLLABLES = tuple(
    c + v
    for c in ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
    for v in ("a", "e", "i", "o", "u")
)


@dataclass
class Task:
    kind: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str
    length: int  # actual token count of ``context``
    target_length: int  # the length that was asked for
    depth: float | None  # needle depth (fraction of the context); None for fwe
    seed: int
    filler: str  # filler style ("words" for fwe)
    metric: str  # "all": fraction of answers found; "any": 1 if any is found


# ------------------------------------------------------------------ token counting
class _TokenCounter:
    """Counts tokens of sentences as they appear after a space, with a cache.

    Sums of per-sentence counts are only an estimate of the joined text's count (token
    merges across boundaries); callers verify the final text once and adjust.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, int] = {}

    def pieces(self, texts: Sequence[str]) -> list[int]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            ids = self.tokenizer([" " + t for t in missing], add_special_tokens=False)["input_ids"]
            self._cache.update((t, len(i)) for t, i in zip(missing, ids, strict=True))
        return [self._cache[t] for t in texts]

    def piece(self, text: str) -> int:
        return self.pieces([text])[0]

    def exact(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def _tolerance(length: int) -> int:
    """How far under ``length`` a context may end: 2% and never more than 16 tokens."""
    return max(1, min(16, int(length * 0.02)))


def _too_small(kind: str, length: int, minimum: int) -> KvcliError:
    return KvcliError(f"length {length} is too small for task {kind}: minimum is {minimum} tokens")


# ----------------------------------------------------------- sentence haystacks
def _assemble(fill: list[str], fill_tok: list[int], inserts: list[tuple[float, str]]) -> str:
    """Join filler sentences, placing each insert at the sentence boundary nearest its
    depth (fraction of the filler tokens); inserts with equal positions keep their order."""
    cum = [0]
    for c in fill_tok:
        cum.append(cum[-1] + c)
    total = cum[-1]
    at: dict[int, list[str]] = {}
    for depth, text in inserts:
        target = depth * total
        i = bisect.bisect_left(cum, target)
        if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
            i -= 1
        at.setdefault(i, []).append(text)
    pieces: list[str] = []
    for i in range(len(fill) + 1):
        pieces.extend(at.get(i, ()))
        if i < len(fill):
            pieces.append(fill[i])
    return " ".join(pieces)


def _top_up(gap: int, stream: Iterator[str], counter: _TokenCounter, fill: list[str], fill_tok: list[int]) -> bool:
    """Append whole sentences (from the stream, then short pads) that fit ``gap``."""
    added = False
    tries = 0
    while gap > 0 and tries < 40:
        tries += 1
        s = next(stream)
        c = counter.piece(s)
        if c <= gap:
            fill.append(s)
            fill_tok.append(c)
            gap -= c
            added = True
    pads = sorted(zip(counter.pieces(PADS), PADS, strict=True), reverse=True)
    while gap > 0:
        fitting = [(c, p) for c, p in pads if c <= gap]
        if not fitting:
            break
        c, p = fitting[0]
        fill.append(p)
        fill_tok.append(c)
        gap -= c
        added = True
    return added


def _haystack(
    counter: _TokenCounter, length: int, inserts: list[tuple[float, str]], stream: Iterator[str]
) -> tuple[str, int]:
    """A context of at most ``length`` tokens (and within tolerance of it) made of filler
    sentences with ``inserts`` (depth, sentence) at sentence boundaries."""
    tol = _tolerance(length)
    budget = length - sum(counter.pieces([t for _, t in inserts]))
    fill: list[str] = []
    fill_tok: list[int] = []
    total = 0
    full = False
    while not full:
        batch = [next(stream) for _ in range(64)]
        for s, c in zip(batch, counter.pieces(batch), strict=True):
            if total + c > budget:
                full = True
                break
            fill.append(s)
            fill_tok.append(c)
            total += c
    _top_up(budget - total, stream, counter, fill, fill_tok)

    best: tuple[str, int] | None = None
    for _ in range(64):
        text = _assemble(fill, fill_tok, inserts)
        n = counter.exact(text)
        if n <= length and (best is None or n > best[1]):
            best = (text, n)
        if length - tol <= n <= length:
            return text, n
        if n > length:
            excess = n - length
            while excess > 0 and fill:
                excess -= fill_tok.pop()
                fill.pop()
        elif not _top_up(length - n, stream, counter, fill, fill_tok):
            break
    if best is None:  # pragma: no cover - only with pathological tokenizers
        raise KvcliError(f"could not build a context of {length} tokens")
    return best


# ------------------------------------------------------------------- the tasks
def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in keys:
            keys.append(k)
    return keys


def _values(rng: random.Random, n: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]


def _list_words(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + ", and " + items[-1] if len(items) > 1 else items[0]


def _niah(kind: str, rng: random.Random, depth: float):
    """(inserts, question, answers, answer_prefix, metric) for the needle kinds."""
    if kind == "niah_single":
        (key,) = _keys(rng, 1)
        (value,) = _values(rng, 1)
        inserts = [(depth, NEEDLE.format(key=key, value=value))]
        answers = [value]
    elif kind == "niah_multikey":
        keys = _keys(rng, _N_NEEDLES)
        values = _values(rng, _N_NEEDLES)
        key, value = keys[0], values[0]
        inserts = [(depth, NEEDLE.format(key=key, value=value))]
        inserts += [(rng.random(), NEEDLE.format(key=k, value=v)) for k, v in zip(keys[1:], values[1:], strict=True)]
        answers = [value]
    elif kind == "niah_multivalue":
        (key,) = _keys(rng, 1)
        values = _values(rng, _N_NEEDLES)
        depths = [depth] + [rng.random() for _ in values[1:]]
        inserts = [(d, NEEDLE.format(key=key, value=v)) for d, v in zip(depths, values, strict=True)]
        answers = values
    else:  # niah_multiquery
        keys = _keys(rng, _N_NEEDLES)
        values = _values(rng, _N_NEEDLES)
        depths = [depth] + [rng.random() for _ in values[1:]]
        inserts = [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values, strict=True)]
        answers = values
    inserts.sort(key=lambda x: x[0])
    if kind in ("niah_single", "niah_multikey"):
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
        metric = "any"
    elif kind == "niah_multivalue":
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
        metric = "all"
    else:
        keys_text = _list_words(keys)
        question = f"What are all the special magic numbers for {keys_text} mentioned in the provided text?"
        prefix = f"The special magic numbers for {keys_text} mentioned in the provided text are"
        metric = "all"
    return inserts, question, answers, prefix, metric


def _vt(rng: random.Random, depth: float):
    names: list[str] = []
    while len(names) < _VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names and name != "VAR":
            names.append(name)
    value = str(rng.randint(10_000, 99_999))
    statements = [f"VAR {names[0]} = {value}."]
    statements += [f"VAR {b} = VAR {a}." for a, b in pairwise(names)]
    # The chain is read in order: later hops sit later in the context, after ``depth``.
    depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in statements[1:])
    inserts = list(zip(depths, statements, strict=True))
    question = f"Find all variables that are assigned the value {value} in the text above."
    prefix = f"The variables that are assigned the value {value} in the text above are"
    return inserts, question, names, prefix, "all"


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _fwe_margin_ok(counts: Counter, top: list[str]) -> bool:
    others = max((c for w, c in counts.items() if w not in top), default=0)
    need = others + max(2, math.ceil(0.25 * others))
    return all(counts[t] >= need for t in top)


def _fwe_enforce(words: list[str], top: list[str], rng: random.Random) -> None:
    """Make the top words clearly the most frequent by rewriting other-word occurrences."""
    counts = Counter(words)
    while not _fwe_margin_ok(counts, top):
        leader = max((w for w in counts if w not in top), key=lambda w: (counts[w], w))
        target = min(top, key=lambda t: (counts[t], t))
        positions = [i for i, w in enumerate(words) if w == leader]
        i = rng.choice(positions)
        words[i] = target
        counts[leader] -= 1
        counts[target] += 1


def _fwe(counter: _TokenCounter, rng: random.Random, length: int) -> tuple[str, int, list[str]]:
    tol = _tolerance(length)
    vocab = _pseudo_words(rng, max(60, min(2000, length // 8)))
    top = vocab[:_FWE_TOP]
    cum_weights: list[float] = []
    acc = 0.0
    for rank in range(1, len(vocab) + 1):
        acc += rank**-_FWE_ALPHA
        cum_weights.append(acc)
    vocab_tok = dict(zip(vocab, counter.pieces(vocab), strict=True))

    words: list[str] = []
    total = 0
    while True:
        w = rng.choices(vocab, cum_weights=cum_weights)[0]
        if total + vocab_tok[w] > length:
            break
        words.append(w)
        total += vocab_tok[w]
    for _ in range(64):
        _fwe_enforce(words, top, rng)
        text = " ".join(words)
        n = counter.exact(text)
        if length - tol <= n <= length:
            return text, n, top
        if n > length:
            excess = n - length
            while excess > 0 and words:
                excess -= vocab_tok[words.pop()]
        else:
            gap = length - n
            tail = [w for w in vocab[_FWE_TOP:] if vocab_tok[w] <= gap]
            if not tail:
                return text, n, top
            while gap > tol and tail:
                w = rng.choice(tail)
                words.append(w)
                gap -= vocab_tok[w]
                tail = [t for t in tail if vocab_tok[t] <= gap]
    raise KvcliError(f"could not build a word-frequency context of {length} tokens")  # pragma: no cover


def _generate(
    kind: str, counter: _TokenCounter, length: int, seed: int, depth: float | None, filler: str | None
) -> Task:
    if kind not in KINDS:
        raise KvcliError(f"unknown task kind {kind!r} (choose from {', '.join(KINDS)})")
    if isinstance(length, bool) or not isinstance(length, int):
        raise KvcliError(f"task length must be a whole number of tokens, got {length!r}")
    if length < MIN_LENGTH[kind]:
        raise _too_small(kind, length, MIN_LENGTH[kind])
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise KvcliError(f"depth must be between 0 and 1, got {depth}")
    if filler is not None and filler not in STYLES and not (kind == "fwe" and filler == "words"):
        raise KvcliError(f"unknown filler style {filler!r} (choose from {', '.join(STYLES)})")

    rng = random.Random(f"kvcli-eval/{kind}/{seed}")
    # Always draw the defaults so that giving a depth or filler changes nothing else.
    drawn_depth = round(rng.random(), 3)
    drawn_style = rng.choice(STYLES)

    if kind == "fwe":
        context, n, answers = _fwe(counter, rng, length)
        return Task(
            kind=kind,
            context=context,
            question="What are the three most frequently appearing words in the above text?",
            answers=answers,
            answer_prefix="The three most frequently appearing words in the above text are",
            length=n,
            target_length=length,
            depth=None,
            seed=seed,
            filler="words",
            metric="all",
        )

    depth = drawn_depth if depth is None else float(depth)
    style = drawn_style if filler is None else filler
    if kind == "vt":
        inserts, question, answers, prefix, metric = _vt(rng, depth)
    else:
        inserts, question, answers, prefix, metric = _niah(kind, rng, depth)
    insert_tokens = sum(counter.pieces([t for _, t in inserts]))
    if 2 * insert_tokens > length:  # the needles would drown the haystack
        raise _too_small(kind, length, max(MIN_LENGTH[kind], 2 * insert_tokens))
    stream = filler_sentences(style, random.Random(f"kvcli-eval-filler/{kind}/{seed}/{style}"))
    context, n = _haystack(counter, length, inserts, stream)
    return Task(
        kind=kind,
        context=context,
        question=question,
        answers=answers,
        answer_prefix=prefix,
        length=n,
        target_length=length,
        depth=depth,
        seed=seed,
        filler=style,
        metric=metric,
    )


def generate_task(
    kind: str, tokenizer, length: int, seed: int, depth: float | None = None, filler: str | None = None
) -> Task:
    """One task of ``kind`` whose context has ``length`` tokens (never more, at most 2%
    and 16 tokens fewer) under ``tokenizer`` (a Hugging Face tokenizer).

    ``depth`` (0..1) places the needle, or the first statement of the variable chain;
    ``filler`` picks a style from ``kvcli.eval.fillers.STYLES``. Both default to values
    drawn from ``seed``. Raises KvcliError for an unknown kind / style or a length below
    the kind's minimum.
    """
    return _generate(kind, _TokenCounter(tokenizer), length, seed, depth, filler)


def _sample_seed(seed: int, i: int) -> int:
    return random.Random(f"kvcli-eval-suite/{seed}/{i}").randrange(2**31)


def generate_suite(
    kinds: Iterable[str],
    lengths: Iterable[int],
    samples: int,
    seed: int,
    tokenizer,
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
) -> list[Task]:
    """``samples`` tasks for every (kind, length). Sample ``i`` uses the same derived seed
    at every length (same needle, different haystack size), so lengths compare fairly;
    niah_single cycles through ``depths``, the other kinds draw depths from the seed."""
    kinds, lengths, depths = list(kinds), list(lengths), list(depths)
    for kind in kinds:
        if kind not in KINDS:
            raise KvcliError(f"unknown task kind {kind!r} (choose from {', '.join(KINDS)})")
    if samples < 1:
        raise KvcliError(f"samples must be at least 1, got {samples}")
    if not depths:
        raise KvcliError("depths must not be empty")
    counter = _TokenCounter(tokenizer)
    tasks: list[Task] = []
    for kind in kinds:
        for length in lengths:
            for i in range(samples):
                depth = depths[i % len(depths)] if kind == "niah_single" else None
                tasks.append(_generate(kind, counter, length, _sample_seed(seed, i), depth, None))
    return tasks
