"""What several commands do the same way: load the model and prefill a document, with the
shared progress display, and the flag-worded errors only the command line needs."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..core.errors import KvcliError
from .options import note, progress

if TYPE_CHECKING:  # annotations only: the command bodies import the library when they run
    from ..api import Context, LoadedModel
    from ..api.settings import Settings


def load_model(model: str, device: str, dtype: str, quiet: bool) -> LoadedModel:
    """``api.load_model`` with the first-run conversion shown on the progress display."""
    from .. import api

    bar = progress(not quiet)
    if bar is None:
        return api.load_model(model, device=device, dtype=dtype, quiet=quiet)
    tasks: dict[str, Any] = {}

    def on_status(description: str, done: int, total: int) -> None:
        if "task" not in tasks:
            bar.start()
            tasks["task"] = bar.add_task(description, total=total, info="")
        bar.update(tasks["task"], completed=done, total=total, description=description)

    try:
        return api.load_model(model, device=device, dtype=dtype, quiet=quiet, on_status=on_status)
    finally:
        if tasks:  # shown only while the embedded model is first converted
            bar.stop()


def prefill_document(
    document: str,
    settings: Settings,
    *,
    model: str,
    device: str,
    dtype: str,
    attn: str,
    truncate: bool,
    quiet: bool,
    question: str | None = None,
) -> Context:
    """Open ``document``, load the model, prefill with a progress bar; notes on stderr."""
    from .. import api
    from ..attention.backends import resolve_backend

    doc = api.open_document(document)
    backend = resolve_backend(attn, device)
    if settings.method == "pod" and not settings.budget.is_full and not quiet:
        note(
            "pod keeps every token (its saving is the shared distant keys); "
            "--budget applies to pod+kvmerger and pod+snapkv, ignored here"
        )
    lm = load_model(model, device, dtype, quiet)
    bar = progress(not quiet, unit="tokens")
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = dict(
        method=settings.method,
        budget=settings.budget,
        chunk_size=settings.chunk_size,
        truncate=truncate,
        method_options=settings.options,
        backend=backend,
        question=question,
    )
    try:
        if bar is None:
            ctx = api.prefill(lm, doc, **kwargs)
        else:
            with bar:
                task = bar.add_task("prefill", total=None, info="")

                def on_chunk(done: int, total: int) -> None:
                    rate = done / max(time.perf_counter() - t0, 1e-9)
                    bar.update(task, completed=done, total=total, info=f"{rate:,.0f} tok/s")

                ctx = api.prefill(lm, doc, on_progress=on_chunk, **kwargs)
    except api.DocumentTooLong as exc:
        raise KvcliError(
            f"document is {exc.tokens} tokens; the model handles {exc.limit} positions ({exc.keep} for "
            f"the document after reserving {exc.limit - exc.keep} for the question and answer); "
            f"use --truncate to keep the first {exc.keep} tokens"
        ) from None
    if ctx.truncated and not quiet:
        note(f"document truncated: kept the first {ctx.context_tokens} tokens, dropped {ctx.truncated}")
    return ctx
