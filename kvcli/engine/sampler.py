"""Choosing the next token from logits: greedy by default, else seeded temperature / nucleus sampling."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.errors import KvcliError


@dataclass
class Sampler:
    """Greedy by default; temperature / nucleus sampling with a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    _gen: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise KvcliError(f"temperature {self.temperature} is invalid: it must be >= 0", option="temperature")
        if not 0 < self.top_p <= 1:
            raise KvcliError(f"top_p {self.top_p} is invalid: it must be in (0, 1]", option="top_p")

    def __call__(self, logits: torch.Tensor) -> int:
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
