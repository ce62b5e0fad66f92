"""``kvcli calibrate``: parse, call ``kvcli.calibrate``, write the PoD profile, render."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .calibrate import (DEFAULT_MAX_BLOCK, DEFAULT_QUERIES, DEFAULT_SINKS, DEFAULT_THRESHOLD, DEFAULT_TOKENS,
                        HEAD_MODES, LN2, MEASURES)
from .cli import AttnOpt, ChunkOpt, DeviceOpt, DtypeOpt, ModelOpt, QuietOpt, app, err
from .errors import KvcliError


def _check_output(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise KvcliError(f"--output {output}: is a directory (give a file name, e.g. profile.json)")
    if not path.resolve().parent.is_dir():
        raise KvcliError(f"--output {output}: directory {path.resolve().parent} does not exist")
    return path


def _check_numbers(tokens, max_block, threshold, blocks, queries, recent, sinks, measure, heads, chunk_size) -> None:
    if tokens is not None and tokens < 1:
        raise KvcliError(f"invalid --tokens {tokens}: it must be a positive number of tokens")
    if max_block < 0:
        raise KvcliError(f"invalid --max-block {max_block}: it must be 0 (no limit) or more")
    if not threshold >= 0:
        raise KvcliError(f"invalid --threshold {threshold}: it must be >= 0 (JSD in nats, at most ln 2 = {LN2:.3f})")
    if blocks is not None and blocks < 1:
        raise KvcliError(f"invalid --blocks {blocks}: it must be at least 1")
    if queries < 1:
        raise KvcliError(f"invalid --queries {queries}: it must be at least 1")
    if recent is not None and recent < queries:
        raise KvcliError(f"invalid --recent {recent}: it must be at least --queries ({queries})")
    if sinks < 0:
        raise KvcliError(f"invalid --sinks {sinks}: it must be >= 0")
    if measure not in MEASURES:
        raise KvcliError(f"invalid --measure {measure!r}: choose from {', '.join(MEASURES)}")
    if heads not in HEAD_MODES:
        raise KvcliError(f"invalid --heads {heads!r}: choose from {', '.join(HEAD_MODES)}")
    if chunk_size is not None and chunk_size < 1:
        raise KvcliError(f"invalid --chunk-size {chunk_size}: it must be a positive integer")


class _Progress:
    """Prefill, then the measurement, as bars on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = None
        self.tasks: dict[str, int] = {}
        if enabled:
            self.bar = Progress(TextColumn("[bold]{task.description:8s}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), console=err)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if stage not in self.tasks:
            unit = "tokens" if stage == "prefill" else "layer pairs"
            self.tasks[stage] = self.bar.add_task(stage, total=total, unit=unit)
        self.bar.update(self.tasks[stage], completed=done, total=total)


def _render(cal, path: Path, source: str, model: str, default_path: bool) -> None:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(120, shutil.get_terminal_size((120, 24)).columns))
    where = {layer: (b, j) for b, block in enumerate(cal.blocks) for j, layer in enumerate(block)}
    pos = {layer: i for i, layer in enumerate(cal.growing)}
    what = "attention" if cal.measure == "attention" else "own keys vs the anchor's keys"
    what += ", per KV head" if cal.heads == "group" else ", per query head"
    table = Table(title=f"PoD calibration: {model}", title_justify="left", caption_justify="left",
                  caption=f"{source}; {cal.tokens:,} tokens; the last {cal.queries} queries against "
                          f"{cal.distant_keys:,} distant keys (after {cal.sinks} sinks, before the last "
                          f"{cal.recent:,} tokens). JSD ({what}) in nats, at most ln 2 = {LN2:.3f}; "
                          "distant share: attention the queries pay the distant keys.")
    table.add_column("layer", justify="right")
    table.add_column("block", justify="right")
    table.add_column("role")
    table.add_column("JSD to previous full layer", justify="right")
    table.add_column("JSD to block anchor", justify="right")
    table.add_column("distant share", justify="right")

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    for i, layer in enumerate(cal.growing):
        b, j = where[layer]
        anchor = cal.blocks[b][0]
        prev = cal.matrix[i - 1][i] if i else None
        to_anchor = cal.matrix[pos[anchor]][i] if j else None
        table.add_row(str(layer), str(b), "anchor" if j == 0 else "shares keys", fmt(prev), fmt(to_anchor),
                      f"{100 * cal.distant_mass[i]:.1f}%")
    out.print(table)
    rule = cal.rule
    how = (f"the {rule['n_blocks'] - 1} largest consecutive JSDs cut" if rule["rule"] == "blocks" else
           f"join while JSD to the anchor <= {rule['threshold']:.3f}, at most "
           f"{rule['max_block'] or 'any number of'} layers a block")
    out.print(f"blocks: {json.dumps(cal.blocks)}  ({how}); measured in {cal.seconds:.1f} s", soft_wrap=True)
    note = ("PoD picks it up automatically for this model" if default_path
            else f"use it with --method pod -o profile={path}")
    out.print(f"wrote {path} ({note})", soft_wrap=True)


@app.command()
def calibrate(
    document: Annotated[Optional[str], typer.Argument(help="Calibration text: .txt .md .pdf .html, or - for stdin (default: generated filler prose).", metavar="FILE", show_default=False)] = None,
    model: ModelOpt = "embedded",
    tokens: Annotated[Optional[int], typer.Option("--tokens", help=f"Tokens of calibration text (default {DEFAULT_TOKENS}; with FILE, the whole document).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Write the profile here (default: the model's calibration profile in the kvcli cache, which PoD reads automatically).")] = None,
    max_block: Annotated[int, typer.Option("--max-block", help="Most layers in a block (0 = no limit).")] = DEFAULT_MAX_BLOCK,
    threshold: Annotated[float, typer.Option("--threshold", help="A layer joins the block while its JSD (nats) to the block's first layer is at most this (the paper's similarity 0.5 read as 1 - JSD/ln2).", show_default="0.347 = ln 2 / 2")] = DEFAULT_THRESHOLD,
    blocks: Annotated[Optional[int], typer.Option("--blocks", help="Instead: exactly N blocks, cut at the N-1 largest consecutive JSDs.")] = None,
    measure: Annotated[str, typer.Option("--measure", help="attention: JSD of two layers' own distant attention (paper); shared: JSD of a layer's attention with its own vs the anchor's distant keys.")] = "attention",
    heads: Annotated[str, typer.Option("--heads", help="group: average the query heads of each KV head's group, compare KV heads; each: compare query head h with query head h.")] = "group",
    queries: Annotated[int, typer.Option("--queries", help="Observed queries: the last N positions.")] = DEFAULT_QUERIES,
    recent: Annotated[Optional[int], typer.Option("--recent", help="Recent window (proximal) in tokens (default: PoD's, max(256, 12.5% of the tokens)).")] = None,
    sinks: Annotated[int, typer.Option("--sinks", help="First tokens that are proximal (PoD's n_s).")] = DEFAULT_SINKS,
    chunk_size: ChunkOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile JSON on stdout instead of the table.")] = False,
    quiet: QuietOpt = False,
):
    """Group PoD's full-attention layers into blocks by the similarity of their distant attention."""
    from . import api
    from .backends import resolve_backend
    from .calibrate import calibrate as run_calibration, document_ids, filler_ids, write_profile
    from .methods.pod import calibration_path
    from .models import resolve_device, resolve_dtype

    _check_numbers(tokens, max_block, threshold, blocks, queries, recent, sinks, measure, heads, chunk_size)
    out_path = _check_output(output)
    doc = api.open_document(document) if document is not None else None
    resolve_dtype(dtype, resolve_device(device))
    backend = resolve_backend(attn, device)
    lm = api.load_model(model, device=device, dtype=dtype, quiet=quiet or as_json)

    limit = lm.max_positions
    if doc is not None:
        ids = document_ids(lm, doc.text)
        if tokens is not None:
            ids = ids[:tokens]
        source = f"{doc.source}"
    else:
        n = tokens or DEFAULT_TOKENS
        if limit and n > limit:
            raise KvcliError(f"--tokens {n}: the model handles {limit} positions")
        ids = filler_ids(lm, n)
        source = "generated filler prose (seed 0)"
    if limit and len(ids) > limit:
        if not (quiet or as_json):
            err.print(f"[yellow]note:[/] calibration text cut to the model's {limit} positions (of {len(ids)} tokens)")
        ids = ids[:limit]

    with _Progress(not (quiet or as_json)) as progress:
        cal = run_calibration(lm, ids, threshold=threshold, max_block=max_block, n_blocks=blocks, queries=queries,
                              recent=recent, sinks=sinks, how=measure, heads=heads,
                              chunk_size=chunk_size or api.DEFAULT_CHUNK, backend=backend, on_progress=progress)
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    default_path = out_path is None
    if default_path:
        out_path = calibration_path(config)
        out_path.parent.mkdir(parents=True, exist_ok=True)
    data = cal.profile(lm.name)
    data["config"] = str(getattr(config, "_name_or_path", "") or "")
    data["source"] = source
    data["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = write_profile(out_path, data)
    if as_json:
        print(json.dumps({**data, "path": str(path)}, indent=2))
    else:
        _render(cal, path, source, lm.name, default_path)
