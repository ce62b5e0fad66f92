"""``kvcli compress``: prefill a document once and save the compressed context (``.kvc``).

``kvcli ask doc.kvc "q"`` and ``kvcli summarize doc.kvc`` then answer from it without the
document and without prefilling again; ``kvcli info doc.kvc`` says what it holds.
``--append doc.kvc`` continues a saved context with more text, under its budget.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core import defaults, kvcfile
from ..core.documents import load_document
from ..core.errors import KvcliError
from . import checks
from .common import PREFILL_FLAGS, given, open_saved, prefill_document, refuse_prefill_flags
from .config import run_settings
from .options import (
    AllocationOpt,
    AttnOpt,
    BudgetOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MethodOpt,
    ModelOpt,
    OptionOpt,
    PresetOpt,
    QuietOpt,
    ScoringOpt,
    TruncOpt,
    parse_options,
)
from .status import RunStatus

OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        "-O",
        help="The .kvc file to write (default: the document's name with .kvc, in the current directory; "
        "with --append: the context appended to).",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Replace the output file if it exists.")]
AppendOpt = Annotated[
    str | None,
    typer.Option(
        "--append",
        "-a",
        help="A saved context to continue with this document, at its next positions and under its budget "
        "(its method, budget and scoring apply).",
    ),
]


def compress(
    click_ctx: typer.Context,
    document: Annotated[str, typer.Argument(help="Document: .txt .md .pdf .html, or - for stdin.")],
    output: OutputOpt = None,
    force: ForceOpt = False,
    append: AppendOpt = None,
    model: ModelOpt = defaults.MODEL,
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    scoring: ScoringOpt = None,
    allocation: AllocationOpt = None,
    chunk_size: ChunkOpt = None,
    truncate: TruncOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Prefill a document once and save the compressed context to a .kvc file (ask it later)."""
    checks.run_options(device, dtype, attn)
    if kvcfile.looks_saved(document):
        raise KvcliError(
            f"{document} is a saved context (.kvc), not a document: ask it with `kvcli ask {document} QUESTION`, "
            f"or continue it with `kvcli compress MORE.txt --append {document}`"
        )
    settings = None
    if append is not None:
        refuse_prefill_flags(click_ctx, append, {k: v for k, v in PREFILL_FLAGS.items() if k != "truncate"})
        kvcfile.read(append)  # a bad file fails now, before any model loads
        target = Path(output) if output is not None else Path(append)
        replace = force or output is None  # appending in place replaces the context it continues
    else:
        settings = run_settings(
            preset=preset,
            method=method,
            budget=budget,
            chunk_size=chunk_size,
            options=parse_options(option),
            scoring=scoring,
            allocation=allocation,
        )
        if "question" in settings.scoring:
            raise KvcliError(
                f"--scoring {settings.scoring}: a saved context has no questions at prefill; use auto, recon or window"
            )
        target = Path(output) if output is not None else _default_output(document)
        replace = force
    _check_output(target, replace, document)
    # A bad document fails before torch loads (prefill_document opens it first as well).
    doc = load_document(document) if append is not None else None
    quiet_run = quiet or as_json
    with RunStatus(not quiet_run) as status:
        if append is not None:
            ctx = open_saved(
                append,
                model=model,
                model_given=given(click_ctx, "model"),
                device=device,
                dtype=dtype,
                attn=attn,
                quiet=quiet_run,
                status=status,
            )
            from ..api import DocumentTooLong, append_document

            status.start_prefill()
            try:
                assert doc is not None
                append_document(ctx, doc, truncate=truncate, on_progress=status.prefill)
            except DocumentTooLong as exc:
                raise KvcliError(
                    f"{document}: {append} holds {ctx.context_tokens} tokens and this adds "
                    f"{exc.tokens - ctx.context_tokens}; the model handles {exc.limit} positions "
                    f"({exc.keep} for the context); use --truncate to keep what fits"
                ) from None
        else:
            assert settings is not None
            ctx = prefill_document(
                document,
                settings,
                model=model,
                device=device,
                dtype=dtype,
                attn=attn,
                truncate=truncate,
                quiet=quiet_run,
                status=status,
            )
        status.stage(f"writing {target}")
        saved = ctx.save(target, force=replace)
    report = ctx.report().as_dict()
    if as_json:
        print(json.dumps({"output": str(target), "file_bytes": saved.file_bytes, **report}, indent=2))
        return
    print(
        f"{target}: {ctx.context_tokens:,} tokens, {report['method']} at budget {report['budget']}, "
        f"{_size(saved.file_bytes)} on disk (KV cache {_size(report['kv_bytes'])}, "
        f"{report['kv_ratio']:.0%} of the full cache's {_size(report['kv_bytes_full'])})"
    )


def _default_output(document: str) -> Path:
    if document == "-":
        raise KvcliError("a document read from stdin needs --output FILE.kvc")
    return Path(Path(document).name).with_suffix(kvcfile.SUFFIX)


def _check_output(target: Path, replace: bool, document: str) -> None:
    """Where the context goes, checked before any work: a .kvc name, in a directory that
    exists, not the document, and no existing file replaced without ``--force``."""
    if target.suffix.lower() != kvcfile.SUFFIX:
        raise KvcliError(f"--output {target}: a saved context's name must end in {kvcfile.SUFFIX}")
    if not target.parent.is_dir():
        raise KvcliError(f"--output {target}: directory {target.parent} does not exist")
    if target.is_dir():
        raise KvcliError(f"--output {target}: is a directory")
    if document != "-" and _same(target, Path(document)):
        raise KvcliError(f"--output {target}: is the document itself")
    if target.exists() and not replace:
        raise KvcliError(f"--output {target}: exists; use --force to replace it")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _size(n: Any) -> str:
    n = int(n)
    return f"{n / 1024**2:,.1f} MiB" if n >= 1024**2 else f"{n:,} bytes"
