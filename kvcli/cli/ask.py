"""``kvcli ask``: answer questions about a document from one prefill."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..core import defaults
from ..core.errors import KvcliError
from ..core.kvcfile import looks_saved
from . import checks
from .common import open_context, refuse_prefill_flags
from .config import run_settings
from .options import (
    AllocationOpt,
    AttnOpt,
    BudgetOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewOpt,
    MethodOpt,
    ModelOpt,
    NoAdapterOpt,
    OptionOpt,
    PresetOpt,
    QuietOpt,
    ScoringOpt,
    SeedOpt,
    TempOpt,
    TopPOpt,
    TruncOpt,
    emit,
    parse_options,
)
from .status import RunStatus

QueryAwareOpt = Annotated[
    bool,
    typer.Option(
        "--query-aware/--no-query-aware",
        help="Same as --scoring question: the questions score the context entries (the default, auto, "
        "already does when it measured best).",
    ),
]


def ask(
    click_ctx: typer.Context,
    document: Annotated[
        str,
        typer.Argument(help="Document: .txt .md .pdf .html, - for stdin, or a saved context (.kvc, `kvcli compress`)."),
    ],
    questions: Annotated[list[str], typer.Argument(help="One or more questions; the document is prefilled once.")],
    model: ModelOpt = defaults.MODEL,
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    scoring: ScoringOpt = None,
    allocation: AllocationOpt = None,
    query_aware: QueryAwareOpt = False,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    truncate: TruncOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    no_adapter: NoAdapterOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer questions about a document."""
    checks.generation(max_new_tokens, temperature, top_p)
    checks.run_options(device, dtype, attn)
    saved = looks_saved(document)
    if saved:
        refuse_prefill_flags(click_ctx, document)
    if query_aware and not saved:
        if scoring not in (None, "question"):
            raise KvcliError(f"--query-aware means --scoring question; it contradicts --scoring {scoring}")
        scoring = "question"
    settings = None
    if not saved:
        settings = run_settings(
            preset=preset,
            method=method,
            budget=budget,
            chunk_size=chunk_size,
            options=parse_options(option),
            scoring=scoring,
            allocation=allocation,
            no_adapter=no_adapter,
        )
    with RunStatus(not (quiet or as_json)) as status:
        ctx = open_context(
            document,
            settings,
            click_ctx,
            model=model,
            device=device,
            dtype=dtype,
            attn=attn,
            truncate=truncate,
            quiet=quiet or as_json,
            status=status,
            questions=questions,  # known before prefill: question scorings use them
        )
        from ..api import Sampler

        sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)
        write = status.first(emit)  # the status line goes when the answer starts
        results = []
        for i, q in enumerate(questions):
            if not as_json and len(questions) > 1:
                write(f"{'' if i == 0 else chr(10)}Q: {q}\nA: ")
            ans = ctx.ask(
                q,
                max_new_tokens=defaults.ASK_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
                sampler=sampler,
                on_text=None if as_json else write,
            )
            if not as_json:
                write("\n")
            results.append({"question": q, "answer": ans.text})
    if as_json:
        print(json.dumps({"answers": results, **ctx.report().as_dict()}, indent=2))
