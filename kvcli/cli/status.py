"""One status line on stderr from the start of a run to its first answer token.

It says what is happening now: loading the libraries and the model, converting the
embedded model (first run), prefill (tokens done, tokens/s, ETA), then reading the
question; it disappears when the first token of the answer is printed.  Disabled (``-q``,
``--json``) it does nothing, so stdout carries only the answer or the JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Self

from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from .options import err


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class RunStatus:
    """``with RunStatus(enabled) as status:`` then ``status.stage(...)``, ``status.prefill`` as
    the prefill callback, ``status.first(emit)`` for what prints the answer."""

    def __init__(self, enabled: bool) -> None:
        self.progress: Progress | None = None
        if enabled:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            )
        self.task: TaskID | None = None
        self.t0 = 0.0

    def __enter__(self) -> Self:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("starting", total=None, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def stage(self, description: str, info: str = "", done: int | None = None, total: int | None = None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=description, info=info, completed=done or 0, total=total)

    # ---- callbacks the library calls -----------------------------------------------------------
    def converting(self, description: str, done: int, total: int) -> None:
        """``api.load_model``'s ``on_status`` (the embedded model's first-run conversion)."""
        self.stage(description, f"step {done}/{total}", done, total)

    def start_prefill(self) -> None:
        self.t0 = time.perf_counter()
        self.stage("prefill", "tokenizing")

    def prefill(self, done: int, total: int) -> None:
        """``api.prefill``'s ``on_progress``: tokens done, rate and time left."""
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = f", eta {_clock((total - done) / rate)}" if rate > 0 and total > done else ""
        self.stage("prefill", f"{done:,}/{total:,} tokens, {rate:,.0f} tok/s{eta}", done, total)
        if done >= total and self.progress is not None and not err.is_terminal:
            # Not a terminal (a log, a pipe): the live line is not drawn, so say once what was done.
            err.print(f"prefill {total:,} tokens in {_clock(time.perf_counter() - self.t0)} ({rate:,.0f} tok/s)")

    def first(self, write: Callable[[str], Any]) -> Callable[[str], Any]:
        """``write``, stopping the status before the first thing it writes."""

        def wrapped(text: str) -> Any:
            self.stop()
            return write(text)

        return wrapped
