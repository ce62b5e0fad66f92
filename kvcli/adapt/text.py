"""Training and held-out text that every machine has offline.

* Installed documentation: the long descriptions (READMEs) in the metadata of the Python
  packages installed next to kvcli (``importlib.metadata``), each package wholly in the
  training or the held-out part (by a hash of its name: about one in five is held out).
* The eval suite's generated fillers (``kvcli.eval.fillers``, styles ``prose`` and ``report``).

Training samples are ``tokens`` long: a run of documentation (or filler) with a few *copy
spans*: pieces of the sample's distant part repeated later, in its last chunk.  Predicting
a repeated piece needs the distant keys, which is what PoD's members must learn to read
through the anchor's keys; the spans are generic text, not the eval's needle wording.
Held-out samples are plain documentation from the held-out packages (no copy spans).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from ..core.errors import KvcliError
from ..eval.fillers import filler_sentences

MIN_CHARS = 2000  # a package description shorter than this is skipped
HELD_OUT_ONE_IN = 5


def installed_docs() -> list[tuple[str, str]]:
    """``(package, long description)`` of every installed package that has a real one."""
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        meta: Any = dist.metadata  # an email.message.Message: headers, then the long description
        name = str(meta.get("Name") or "").lower()
        if not name or name in seen:
            continue
        body = meta.get_payload() if hasattr(meta, "get_payload") else ""
        text = str(body or meta.get("Description") or "").strip()
        if len(text) >= MIN_CHARS:
            seen[name] = text
    return sorted(seen.items())


def held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % HELD_OUT_ONE_IN == 0


@dataclass
class Corpus:
    """Token streams: ``train`` (documentation), ``held`` (held-out documentation), ``filler``."""

    train: list[int]
    held: list[int]
    filler: list[int]
    packages: list[str]  # where the documentation came from
    held_packages: list[str]


def _ids(tokenizer: Any, texts: list[str]) -> list[int]:
    out: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for text in texts:
        out.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            out.append(int(eos))
    return out


def filler_text(chars: int, seed: int) -> str:
    rng = random.Random(seed)
    parts: list[str] = []
    for style in ("prose", "report"):
        stream = filler_sentences(style, rng)
        n = 0
        while n < chars // 2:
            parts.append(next(stream))
            n += len(parts[-1]) + 1
    return " ".join(parts)


def build_corpus(tokenizer: Any, tokens: int, docs: list[tuple[str, str]] | None = None) -> Corpus:
    """Tokenized text for samples of ``tokens``; an error if there is too little of it."""
    docs = installed_docs() if docs is None else docs
    train = [(n, t) for n, t in docs if not held_out(n)]
    held = [(n, t) for n, t in docs if held_out(n)]
    corpus = Corpus(
        train=_ids(tokenizer, [t for _, t in train]),
        held=_ids(tokenizer, [t for _, t in held]),
        filler=_ids(tokenizer, [filler_text(12 * tokens, seed=1)]),
        packages=[n for n, _ in train],
        held_packages=[n for n, _ in held],
    )
    if len(corpus.train) < 2 * tokens and len(corpus.filler) < 2 * tokens:
        raise KvcliError(f"adapt: too little training text for {tokens}-token samples", option="tokens")
    return corpus


def training_sample(
    corpus: Corpus, step: int, tokens: int, seed: int, distant_end: int, copies: int, span: int, filler_share: float
) -> list[int]:
    """Sample ``step`` (the same for the same arguments, so a resumed run sees what it would
    have): ``tokens`` ids with ``copies`` spans of ``span`` ids from ``[0, distant_end)``
    repeated in the last quarter."""
    rng = random.Random(hashlib.sha256(f"{seed}:{step}".encode()).digest())
    use_filler = rng.random() < filler_share or len(corpus.train) < 2 * tokens
    stream = corpus.filler if use_filler else corpus.train
    start = rng.randrange(0, len(stream) - tokens)
    ids = list(stream[start : start + tokens])
    tail_from = tokens - tokens // 4
    if copies and span and distant_end > span:
        for _ in range(copies):
            src = rng.randrange(0, distant_end - span)
            dst = rng.randrange(tail_from, tokens - span)
            ids[dst : dst + span] = ids[src : src + span]
    return ids


def held_out_samples(corpus: Corpus, n: int, tokens: int) -> list[list[int]]:
    """``n`` evenly spaced windows of the held-out documentation (filler if there is none)."""
    stream = corpus.held if len(corpus.held) >= tokens else corpus.filler[len(corpus.filler) // 2 :]
    if len(stream) < tokens:
        return []
    room = len(stream) - tokens
    return [list(stream[(i * room) // max(1, n - 1) if n > 1 else 0 :][:tokens]) for i in range(n)]
