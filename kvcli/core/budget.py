"""Budgets: how many entries a growing layer may keep after each prefill chunk."""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import defaults
from .errors import KvcliError

ALLOCATIONS = ("auto", "uniform", "global", "heads", "relative")  # how the growing layers share a budget


@dataclass(frozen=True)
class Budget:
    """Either a ratio in (0, 1] of the tokens seen so far, or an absolute entry count, per
    growing layer; ``allocation`` says how the layers share it (``kvcli.methods.allocation``):
    ``uniform`` (each layer that many), ``global`` (layers x that many, ranked across layers),
    ``heads`` (ranked across layers and KV heads), ``relative`` (as ``heads``, each score
    divided by the mean over every entry its head has ranked first) or ``auto`` (the default,
    ``defaults.ALLOCATION``: the method's own, ``Method.allocation``, which a run's budget
    names instead)."""

    ratio: float | None = None
    tokens: int | None = None
    allocation: str = defaults.ALLOCATION

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise KvcliError(
                f"allocation {self.allocation!r} is unknown: use {' or '.join(ALLOCATIONS)}", option="allocation"
            )

    def target(self, seen: int) -> int:
        if self.tokens is not None:
            return min(self.tokens, seen)
        assert self.ratio is not None  # a budget is a ratio or a token count
        return min(seen, max(1, math.ceil(self.ratio * seen)))

    @property
    def is_full(self) -> bool:
        return self.ratio == 1.0

    def __str__(self) -> str:
        size = str(self.tokens) if self.tokens is not None else f"{self.ratio:g}"
        # Always with its allocation (the whole cache has nothing to allocate: plain "1"), so the
        # text parses back to the same budget whatever the default.
        return size if self.is_full else f"{size}:{self.allocation}"


FULL = Budget(ratio=1.0)


def parse_budget(value: str | float | int, allocation: str | None = None) -> Budget:
    """Parse ``0.5`` (ratio), ``1``/``1.0`` (everything) or ``2048`` (entries), each optionally
    followed by ``:ALLOCATION`` (``0.5:global``; ``str(budget)`` writes it back that way);
    ``allocation`` applies when the text names none (default ``defaults.ALLOCATION``, for the
    library and the command line alike)."""
    allocation = defaults.ALLOCATION if allocation is None else allocation
    text = str(value).strip()
    if ":" in text:
        size, _, allocation = text.partition(":")
        allocation = allocation.strip().lower()
        if allocation not in ALLOCATIONS:
            raise KvcliError(f"invalid budget {text!r}: after ':' give the allocation, {' or '.join(ALLOCATIONS)}")
        budget = parse_budget(size)
        return Budget(ratio=budget.ratio, tokens=budget.tokens, allocation=allocation)
    try:
        number = float(text)
    except ValueError:
        raise KvcliError(f"invalid budget {text!r}: give a ratio in (0, 1] or a token count (integer > 1)") from None
    if not math.isfinite(number) or number <= 0:
        raise KvcliError(f"invalid budget {text!r}: it must be positive (a ratio in (0, 1] or a token count > 1)")
    if number <= 1:
        return Budget(ratio=number, allocation=allocation)
    if number != int(number) or ("." in text and not text.endswith(".0")):
        raise KvcliError(f"invalid budget {text!r}: above 1 it is a token count and must be an integer")
    return Budget(tokens=int(number), allocation=allocation)


def check_chunk_size(chunk_size: int) -> None:
    """The one check of a prefill chunk size (every entry point runs it before any work)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KvcliError(f"chunk_size {chunk_size!r} is invalid: it must be a positive integer", option="chunk_size")
