"""``kvcli summarize``: a summary of a document from its compressed context."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..core import defaults
from .common import prefill_document
from .options import (
    AttnOpt,
    BudgetOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxNewOpt,
    MethodOpt,
    ModelOpt,
    OptionOpt,
    PresetOpt,
    QuietOpt,
    SeedOpt,
    TempOpt,
    TopPOpt,
    TruncOpt,
    emit,
    parse_options,
)


def summarize(
    document: Annotated[str, typer.Argument(help="Document: .txt .md .pdf .html, or - for stdin.")],
    model: ModelOpt = defaults.MODEL,
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    truncate: TruncOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Summarize a document."""
    from ..api import Sampler
    from ..api.settings import resolve_settings

    sampler = Sampler(temperature=temperature, top_p=top_p, seed=seed)
    settings = resolve_settings(
        preset=preset, method=method, budget=budget, chunk_size=chunk_size, options=parse_options(option)
    )
    ctx = prefill_document(
        document,
        settings,
        model=model,
        device=device,
        dtype=dtype,
        attn=attn,
        truncate=truncate,
        quiet=quiet or as_json,
    )
    ans = ctx.summarize(
        max_new_tokens=max_new_tokens or defaults.SUMMARY_MAX_NEW_TOKENS,
        sampler=sampler,
        on_text=None if as_json else emit,
    )
    if as_json:
        print(json.dumps({"summary": ans.text, **ctx.report().as_dict()}, indent=2))
    else:
        emit("\n")
