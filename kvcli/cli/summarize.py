"""``kvcli summarize``: a summary of a document from its compressed context."""

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
    note,
    parse_options,
)
from .status import RunStatus


def summarize(
    click_ctx: typer.Context,
    document: Annotated[
        str,
        typer.Argument(help="Document: .txt .md .pdf .html, - for stdin, or a saved context (.kvc, `kvcli compress`)."),
    ],
    model: ModelOpt = defaults.MODEL,
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    scoring: ScoringOpt = None,
    allocation: AllocationOpt = None,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    repetition_penalty: Annotated[
        float,
        typer.Option(
            "--repetition-penalty",
            help="Divide the logits of tokens the summary already used by this (1 = off; measure with "
            "benchmarks/summary_repetition.py).",
        ),
    ] = defaults.SUMMARY_REPETITION_PENALTY,
    no_repeat_ngram: Annotated[
        int,
        typer.Option("--no-repeat-ngram", help="Never repeat an n-gram of the summary of this many tokens (0 = off)."),
    ] = defaults.SUMMARY_NO_REPEAT_NGRAM,
    truncate: TruncOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    no_adapter: NoAdapterOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Summarize a document."""
    checks.generation(max_new_tokens, temperature, top_p)
    if not 1.0 <= repetition_penalty <= 10.0:  # before any work (the sampler checks again)
        raise KvcliError(f"invalid --repetition-penalty {repetition_penalty}: it must be in [1, 10] (1 = off)")
    if no_repeat_ngram < 0:
        raise KvcliError(f"invalid --no-repeat-ngram {no_repeat_ngram}: it must be 0 (off) or more")
    checks.run_options(device, dtype, attn)
    settings = None
    if looks_saved(document):
        refuse_prefill_flags(click_ctx, document)
    else:
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
        )
        from ..api import Sampler

        write = status.first(emit)  # the status line goes when the summary starts
        cap = defaults.SUMMARY_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        ans = ctx.summarize(
            max_new_tokens=cap,
            sampler=Sampler(
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                repetition_penalty=repetition_penalty,
                no_repeat_ngram=no_repeat_ngram,
            ),
            on_text=None if as_json else write,
        )
    if as_json:
        print(json.dumps({"summary": ans.text, **ctx.report().as_dict()}, indent=2))
    else:
        emit("\n")
    if ans.capped and not quiet:
        note(f"summary stopped at the {cap}-token cap; use --max-new-tokens for a longer one")
