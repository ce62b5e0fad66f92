"""``kvcli summarize``: a summary of a document from its compressed context."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ..core import defaults
from . import checks
from .common import prefill_document
from .config import run_settings
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
from .status import RunStatus


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
    checks.generation(max_new_tokens, temperature, top_p)
    checks.run_options(device, dtype, attn)
    settings = run_settings(
        preset=preset, method=method, budget=budget, chunk_size=chunk_size, options=parse_options(option)
    )
    with RunStatus(not (quiet or as_json)) as status:
        ctx = prefill_document(
            document,
            settings,
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
        ans = ctx.summarize(
            max_new_tokens=defaults.SUMMARY_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens,
            sampler=Sampler(temperature=temperature, top_p=top_p, seed=seed),
            on_text=None if as_json else write,
        )
    if as_json:
        print(json.dumps({"summary": ans.text, **ctx.report().as_dict()}, indent=2))
    else:
        emit("\n")
