"""The remaining time of a long run, computed from the work it has done.

Rich's ``TimeRemainingColumn`` estimates a speed from the updates of its last 30 seconds,
so when every step of a run takes longer than that it shows ``-:--:--`` throughout.  Here
the work is counted in kinds with planned totals (``prefill`` tokens, ``decode`` tokens,
process ``start``s, ``answers``); every report of work done is timed from the previous
report, so all wall time is charged to some kind; the time left is, for every kind, what
is left of it times the seconds per unit measured so far, or a prior (a calibration) until
that kind has been measured.  Nothing here imports torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


class Eta:
    """Seconds left of a run made of ``totals`` units of each kind of work."""

    def __init__(
        self,
        totals: Mapping[str, float],
        prior: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.totals = dict(totals)
        self.prior = dict(prior or {})  # seconds per unit, until measured
        self.done = dict.fromkeys(self.totals, 0.0)
        self.spent = dict.fromkeys(self.totals, 0.0)
        self.clock = clock
        self.started = self.last = clock()

    def record(self, kind: str, amount: float) -> None:
        """``amount`` units of ``kind`` were done since the previous report (or the start)."""
        now = self.clock()
        self.done[kind] = self.done.get(kind, 0.0) + amount
        self.spent[kind] = self.spent.get(kind, 0.0) + (now - self.last)
        self.last = now

    def charge(self, kind: str) -> None:
        """Charge the time since the previous report to ``kind`` without any work done (a
        phase the plan does not count, e.g. waiting for a process to exit)."""
        self.record(kind, 0.0)

    def rate(self, kind: str) -> float | None:
        """Seconds per unit of ``kind``: measured, else the prior, else unknown."""
        if self.done.get(kind):
            return self.spent[kind] / self.done[kind]
        return self.prior.get(kind)

    def seconds_left(self) -> float | None:
        """Planned work left, priced at the measured rates; None while some kind of work is
        left that has neither a measurement nor a prior."""
        left = 0.0
        for kind, total in self.totals.items():
            rest = max(0.0, total - self.done.get(kind, 0.0))
            if rest <= 0:
                continue
            rate = self.rate(kind)
            if rate is None:
                return None
            left += rest * rate
        return left

    def planned_seconds(self) -> float | None:
        """The whole run at the current rates (what a plan line says before any work)."""
        total = 0.0
        for kind, amount in self.totals.items():
            rate = self.rate(kind)
            if rate is None:
                return None
            total += amount * rate
        return total

    def elapsed(self) -> float:
        return self.clock() - self.started

    def text(self) -> str:
        """``eta 3:12``, counted down from the last report, or ``eta ?`` while unknown."""
        left = self.seconds_left()
        if left is None:
            return "eta ?"
        return "eta " + clock_text(max(0.0, left - (self.clock() - self.last)))


def clock_text(seconds: float) -> str:
    """``1:02:03`` or ``4:05``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def minutes_text(seconds: float) -> str:
    """``~40 s``, ``~3 min``, ``~1.5 h``: a plan's rough duration."""
    if seconds < 90:
        return f"~{max(5, 5 * round(seconds / 5))} s"
    if seconds < 5400:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def work_text(prefills: int, lengths: list[int]) -> str:
    """``12 prefills of 2,048 tokens`` / ``24 prefills of 2,048-4,096 tokens``."""
    if not lengths:
        return f"{prefills:,} prefill{'s' if prefills != 1 else ''}"
    span = f"{lengths[0]:,}" if lengths[0] == lengths[-1] else f"{lengths[0]:,}-{lengths[-1]:,}"
    return f"{prefills:,} prefill{'s' if prefills != 1 else ''} of {span} tokens"
