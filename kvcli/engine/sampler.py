"""Choosing the next token from logits: greedy by default, else seeded temperature / nucleus sampling.

Two optional guards against the loops small base models fall into (``kvcli summarize``
uses them; the grid is measured by benchmarks/summary_repetition.py).  Both look only at the tokens
generated so far (``history``), never at the document, which a summary must be free to
quote:

* ``repetition_penalty`` > 1: every token already generated has its logit divided by it
  (multiplied when negative), the CTRL paper's penalty;
* ``no_repeat_ngram`` = n > 0: a token that would complete an n-gram already generated is
  never chosen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..core.errors import KvcliError


def banned_by_ngrams(history: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens that would repeat an n-gram of ``history`` (1-D ids): for every earlier place
    where the last ``n - 1`` tokens occur, the token that followed them there."""
    if n < 1 or history.numel() < n:
        return history.new_empty(0)
    grams = history.unfold(0, n, 1)  # [L - n + 1, n]
    if n == 1:
        return grams[:, 0]
    hit = (grams[:, :-1] == history[-(n - 1) :]).all(dim=1)
    return grams[hit, -1]


@dataclass
class Sampler:
    """Greedy by default; temperature / nucleus sampling with a seeded generator; optional
    repetition penalty and n-gram blocking over the tokens generated so far."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise KvcliError(f"temperature {self.temperature} is invalid: it must be >= 0", option="temperature")
        if not 0 < self.top_p <= 1:
            raise KvcliError(f"top_p {self.top_p} is invalid: it must be in (0, 1]", option="top_p")
        if not 1.0 <= self.repetition_penalty <= 10.0:
            raise KvcliError(
                f"repetition_penalty {self.repetition_penalty} is invalid: it must be in [1, 10] (1 = off)",
                option="repetition_penalty",
            )
        n = self.no_repeat_ngram
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise KvcliError(
                f"no_repeat_ngram {self.no_repeat_ngram!r} is invalid: it must be 0 (off) or an n-gram length >= 1",
                option="no_repeat_ngram",
            )

    @property
    def guards(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram > 0

    def adjust(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """``logits`` with the repetition guards applied (unchanged when they are off)."""
        if not self.guards or not len(history):
            return logits
        out = logits.float().clone()
        ids = torch.as_tensor(list(history), dtype=torch.long, device=out.device)
        if self.repetition_penalty != 1.0:
            seen = torch.unique(ids)
            vals = out[seen]
            out[seen] = torch.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        if self.no_repeat_ngram > 0:
            out[banned_by_ngrams(ids, self.no_repeat_ngram)] = float("-inf")
        return out

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        logits = self.adjust(logits, history)
        if self.temperature <= 0:
            return int(torch.argmax(logits, dim=-1))
        if self._gen is None:
            self._gen = torch.Generator(device="cpu")
            self._gen.manual_seed(self.seed if self.seed is not None else int(time.time_ns() % 2**31))
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cut = torch.cumsum(sorted_p, dim=-1) - sorted_p > self.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._gen))
