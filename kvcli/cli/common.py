"""What several commands do the same way: load the model and prefill a document, with the
shared progress display, and the flag-worded errors only the command line needs."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..core.documents import load_document
from ..core.errors import KvcliError
from .options import note
from .status import RunStatus

if TYPE_CHECKING:  # annotations only: the command bodies import the library when they run
    from ..api import Context, LoadedModel
    from ..api.settings import Settings
    from ..core.documents import Document


def load_model(model: str, device: str, dtype: str, quiet: bool, status: RunStatus | None = None) -> LoadedModel:
    """``api.load_model`` with loading (and the first-run conversion) on the status line:
    ``status``'s when given, else one of its own for the duration of the load."""
    if status is None:
        with RunStatus(not quiet) as own:
            return load_model(model, device, dtype, quiet, own)
    status.stage(f"loading {model}", "libraries")
    from .. import api

    status.stage(f"loading {model}")
    return api.load_model(model, device=device, dtype=dtype, quiet=quiet, on_status=status.converting)


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
    questions: list[str] | None = None,
    status: RunStatus | None = None,
) -> Context:
    """Open ``document`` (before any model library loads: a bad document fails fast), load
    the model, prefill; progress on ``status`` (one of its own when not given), notes on stderr."""
    doc = load_document(document)
    with contextlib.ExitStack() as stack:
        if status is None:
            status = stack.enter_context(RunStatus(not quiet))
        return _prefill(doc, settings, model, device, dtype, attn, truncate, quiet, questions, status)


def _prefill(
    doc: Document,
    settings: Settings,
    model: str,
    device: str,
    dtype: str,
    attn: str,
    truncate: bool,
    quiet: bool,
    questions: list[str] | None,
    status: RunStatus,
) -> Context:
    if settings.method == "pod" and not settings.budget.is_full and not quiet:
        note(
            "pod keeps every token (its saving is the shared distant keys); "
            "--budget applies to pod+kvmerger and pod+snapkv, ignored here"
        )
    status.stage(f"loading {model}", "libraries")
    from .. import api
    from ..attention.backends import resolve_backend

    backend = resolve_backend(attn, device)
    lm = load_model(model, device, dtype, quiet, status)
    kwargs: dict[str, Any] = dict(
        method=settings.method,
        budget=settings.budget,
        chunk_size=settings.chunk_size,
        truncate=truncate,
        method_options=settings.options,
        backend=backend,
        questions=questions,
        scoring=settings.scoring,
    )
    status.start_prefill()
    try:
        ctx = api.prefill(lm, doc, on_progress=status.prefill, **kwargs)
    except api.DocumentTooLong as exc:
        raise KvcliError(
            f"document is {exc.tokens} tokens; the model handles {exc.limit} positions ({exc.keep} for "
            f"the document after reserving {exc.limit - exc.keep} for the question and answer); "
            f"use --truncate to keep the first {exc.keep} tokens"
        ) from None
    if ctx.truncated and not quiet:
        note(f"document truncated: kept the first {ctx.context_tokens} tokens, dropped {ctx.truncated}")
    if settings.budget.tokens is not None and settings.budget.tokens >= ctx.context_tokens and not quiet:
        note(
            f"--budget {settings.budget.tokens} keeps every token of this {ctx.context_tokens}-token document "
            "(nothing is compressed); a ratio such as --budget 0.5 scales with the document"
        )
    status.stage("reading the question" if questions else "starting the answer")
    return ctx


# ---- saved contexts (.kvc) ----------------------------------------------------------------------------
#: Flags that shape a prefill: a saved context keeps the ones it was compressed with.
PREFILL_FLAGS = {
    "method": "--method",
    "budget": "--budget",
    "preset": "--preset",
    "option": "--option",
    "scoring": "--scoring",
    "allocation": "--allocation",
    "query_aware": "--query-aware",
    "chunk_size": "--chunk-size",
    "truncate": "--truncate",
    "no_adapter": "--no-adapter",
}


def given(click_ctx: Any, name: str) -> bool:
    """Whether flag ``name`` was typed on the command line (not a default, nor the config file's)."""
    get = getattr(click_ctx, "get_parameter_source", None)
    source = get(name) if get is not None else None
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT")


def refuse_prefill_flags(click_ctx: Any, path: str, flags: dict[str, str] = PREFILL_FLAGS) -> None:
    """A saved context was compressed already: a flag that would change how is an error."""
    for name, flag in flags.items():
        if name in click_ctx.params and given(click_ctx, name):
            raise KvcliError(
                f"{flag}: {path} is a saved context, compressed already (`kvcli info {path}` shows its settings); "
                "give the document instead to compress it differently"
            )


def open_saved(
    path: str,
    *,
    model: str,
    model_given: bool,
    device: str,
    dtype: str,
    attn: str,
    quiet: bool,
    status: RunStatus,
) -> Context:
    """A saved context: the file checked first (no torch), then its model loaded (the one it
    names, unless ``--model`` says otherwise; its dtype unless ``--dtype`` says otherwise),
    then its tensors."""
    from ..core import kvcfile

    saved, data = kvcfile.read(path)
    header = saved.header
    status.stage(f"loading {header['model']['ref'] if not model_given else model}", "libraries")
    from ..api.reloading import context_from
    from ..attention.backends import resolve_backend

    backend = resolve_backend(attn, device)
    lm = load_model(
        model if model_given else header["model"]["ref"],
        device,
        header["dtype"] if dtype == "auto" else dtype,
        quiet,
        status,
    )
    status.stage("loading the saved context")
    ctx = context_from(lm, saved, data, backend)
    status.stage("reading the question")
    return ctx


def open_context(
    document: str,
    settings: Settings | None,
    click_ctx: Any,
    *,
    model: str,
    device: str,
    dtype: str,
    attn: str,
    truncate: bool,
    quiet: bool,
    status: RunStatus,
    questions: list[str] | None = None,
) -> Context:
    """The context ``ask`` and ``summarize`` answer from: a saved one (``settings`` None:
    ``document`` is a .kvc) or ``document`` prefilled with ``settings``."""
    if settings is None:
        return open_saved(
            document,
            model=model,
            model_given=given(click_ctx, "model"),
            device=device,
            dtype=dtype,
            attn=attn,
            quiet=quiet,
            status=status,
        )
    return prefill_document(
        document,
        settings,
        model=model,
        device=device,
        dtype=dtype,
        attn=attn,
        truncate=truncate,
        quiet=quiet,
        questions=questions,
        status=status,
    )
