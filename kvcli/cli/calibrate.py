"""``kvcli calibrate``: parse, call ``kvcli.profile.calibrate``, write the PoD profile, render."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..core import defaults
from ..core.defaults import CALIBRATE_HEAD_MODES as HEAD_MODES
from ..core.defaults import CALIBRATE_MEASURES as MEASURES
from ..core.defaults import LN2
from ..core.errors import KvcliError
from . import checks
from .common import load_model
from .options import AttnOpt, ChunkOpt, DeviceOpt, DtypeOpt, ModelOpt, ProgressView, QuietOpt, note

if TYPE_CHECKING:  # annotations only: the command body imports the library when it runs
    from ..profile.calibrate import Calibration


def _check_output(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output).expanduser()
    if path.is_dir():
        raise KvcliError(f"--output {output}: is a directory (give a file name, e.g. profile.json)")
    if not path.resolve().parent.is_dir():
        raise KvcliError(f"--output {output}: directory {path.resolve().parent} does not exist")
    return path


@dataclass
class Request:
    """The numbers ``kvcli calibrate`` was given, checked before the model loads."""

    tokens: int | None
    max_block: int
    threshold: float
    blocks: int | None
    queries: int
    recent: int | None
    n_sink: int
    measure: str
    heads: str
    chunk_size: int | None

    def check(self) -> None:
        if self.tokens is not None and self.tokens < 1:
            raise KvcliError(f"invalid --tokens {self.tokens}: it must be a positive number of tokens")
        if self.max_block < 0:
            raise KvcliError(f"invalid --max-block {self.max_block}: it must be 0 (no limit) or more")
        if not self.threshold >= 0:
            raise KvcliError(
                f"invalid --threshold {self.threshold}: it must be >= 0 (JSD in nats, at most ln 2 = {LN2:.3f})"
            )
        if self.blocks is not None and self.blocks < 1:
            raise KvcliError(f"invalid --blocks {self.blocks}: it must be at least 1")
        if self.queries < 1:
            raise KvcliError(f"invalid --queries {self.queries}: it must be at least 1")
        if self.recent is not None and self.recent < self.queries:
            raise KvcliError(f"invalid --recent {self.recent}: it must be at least --queries ({self.queries})")
        if self.n_sink < 0:
            raise KvcliError(f"invalid --n-sink {self.n_sink}: it must be >= 0")
        if self.measure not in MEASURES:
            raise KvcliError(f"invalid --measure {self.measure!r}: choose from {', '.join(MEASURES)}")
        if self.heads not in HEAD_MODES:
            raise KvcliError(f"invalid --heads {self.heads!r}: choose from {', '.join(HEAD_MODES)}")
        if self.chunk_size is not None:
            checks.chunk_size("--chunk-size", self.chunk_size)


class StageProgress(ProgressView):
    """Prefill, then the measurement, as bars on stderr (``calibrate``'s ``on_progress``)."""

    UNITS = {"prefill": "tokens"}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None:
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(f"{stage:8s}", total=total, info=self.UNITS.get(stage, "layer pairs"))
        self.bar.update(self.tasks[stage], completed=done, total=total)


def _render(cal: Calibration, path: Path, source: str, model: str, default_path: bool) -> None:
    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=max(120, shutil.get_terminal_size((120, 24)).columns))
    where = {layer: (b, j) for b, block in enumerate(cal.blocks) for j, layer in enumerate(block)}
    pos = {layer: i for i, layer in enumerate(cal.growing)}
    what = "attention" if cal.measure == "attention" else "own keys vs the anchor's keys"
    what += ", per KV head" if cal.heads == "group" else ", per query head"
    table = Table(
        title=f"PoD calibration: {model}",
        title_justify="left",
        caption_justify="left",
        caption=f"{source}; {cal.tokens:,} tokens; the last {cal.queries} queries against "
        f"{cal.distant_keys:,} distant keys (after {cal.sinks} sinks, before the last "
        f"{cal.recent:,} tokens). JSD ({what}) in nats, at most ln 2 = {LN2:.3f}; "
        "distant share: attention the queries pay the distant keys.",
    )
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
        table.add_row(
            str(layer),
            str(b),
            "anchor" if j == 0 else "shares keys",
            fmt(prev),
            fmt(to_anchor),
            f"{100 * cal.distant_mass[i]:.1f}%",
        )
    out.print(table)
    rule = cal.rule
    how = (
        f"the {rule['n_blocks'] - 1} largest consecutive JSDs cut"
        if rule["rule"] == "blocks"
        else f"join while JSD to the anchor <= {rule['threshold']:.3f}, at most "
        f"{rule['max_block'] or 'any number of'} layers a block"
    )
    out.print(f"blocks: {json.dumps(cal.blocks)}  ({how}); measured in {cal.seconds:.1f} s", soft_wrap=True)
    note = (
        "PoD picks it up automatically for this model"
        if default_path
        else f"use it with --method pod -o profile={path}"
    )
    out.print(f"wrote {path} ({note})", soft_wrap=True)


def calibrate(
    document: Annotated[
        str | None,
        typer.Argument(
            help="Calibration text: .txt .md .pdf .html, or - for stdin (default: generated filler prose).",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = defaults.MODEL,
    tokens: Annotated[
        int | None,
        typer.Option(
            "--tokens",
            help=f"Tokens of calibration text (default {defaults.CALIBRATE_TOKENS}; with FILE, the whole document).",
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="Write the profile here (default: the model's calibration profile in the kvcli cache, which PoD "
            "reads automatically).",
        ),
    ] = None,
    max_block: Annotated[
        int, typer.Option("--max-block", help="Most layers in a block (0 = no limit).")
    ] = defaults.CALIBRATE_MAX_BLOCK,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="A layer joins the block while its JSD (nats) to the block's first layer is at most this (the "
            "paper's similarity 0.5 read as 1 - JSD/ln2).",
            show_default="0.347 = ln 2 / 2",
        ),
    ] = defaults.CALIBRATE_THRESHOLD,
    blocks: Annotated[
        int | None, typer.Option("--blocks", help="Instead: exactly N blocks, cut at the N-1 largest consecutive JSDs.")
    ] = None,
    measure: Annotated[
        str,
        typer.Option(
            "--measure",
            help="attention: JSD of two layers' own distant attention (paper); shared: JSD of a layer's attention "
            "with its own vs the anchor's distant keys.",
        ),
    ] = "attention",
    heads: Annotated[
        str,
        typer.Option(
            "--heads",
            help="group: average the query heads of each KV head's group, compare KV heads; each: compare query head "
            "h with query head h.",
        ),
    ] = "group",
    queries: Annotated[
        int, typer.Option("--queries", help="Observed queries: the last N positions.")
    ] = defaults.CALIBRATE_QUERIES,
    recent: Annotated[
        int | None,
        typer.Option(
            "--recent", help="Recent window (proximal) in tokens (default: PoD's, max(256, 12.5% of the tokens))."
        ),
    ] = None,
    n_sink: Annotated[
        int, typer.Option("--n-sink", "--sinks", help="First tokens that are proximal (PoD's n_sink).")
    ] = defaults.POD_N_SINK,
    chunk_size: ChunkOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the profile JSON on stdout instead of the table.")
    ] = False,
    quiet: QuietOpt = False,
):
    """Group PoD's full-attention layers into blocks by the similarity of their distant attention."""
    from ..core.documents import load_document

    checks.run_options(device, dtype, attn)
    Request(tokens, max_block, threshold, blocks, queries, recent, n_sink, measure, heads, chunk_size).check()
    out_path = _check_output(output)
    doc = load_document(document) if document is not None else None

    from ..attention.backends import resolve_backend
    from ..cache.sizing import cache_shape
    from ..engine.models import resolve_device, resolve_dtype
    from ..methods.pod import calibration_path
    from ..profile.calibrate import calibrate as run_calibration
    from ..profile.calibrate import document_ids, filler_ids, write_profile

    resolve_dtype(dtype, resolve_device(device))
    backend = resolve_backend(attn, device)
    lm = load_model(model, device, dtype, quiet or as_json)
    n_growing = len(cache_shape(lm.model.config).growing_indices)
    if blocks is not None and blocks > n_growing:
        raise KvcliError(f"--blocks {blocks}: give 1 to {n_growing} (the model has {n_growing} full-attention layers)")

    limit = lm.max_positions
    if doc is not None:
        ids = document_ids(lm, doc.text)
        if tokens is not None:
            ids = ids[:tokens]
        source = f"{doc.source}"
    else:
        n = tokens or defaults.CALIBRATE_TOKENS
        if limit and n > limit:
            raise KvcliError(f"--tokens {n}: the model handles {limit} positions")
        ids = filler_ids(lm, n)
        source = "generated filler prose (seed 0)"
    if limit and len(ids) > limit:
        if not (quiet or as_json):
            note(f"calibration text cut to the model's {limit} positions (of {len(ids)} tokens)")
        ids = ids[:limit]

    with StageProgress(not (quiet or as_json)) as on_progress:
        cal = run_calibration(
            lm,
            ids,
            threshold=threshold,
            max_block=max_block,
            n_blocks=blocks,
            queries=queries,
            recent=recent,
            sinks=n_sink,
            how=measure,
            heads=heads,
            chunk_size=chunk_size or defaults.CHUNK_SIZE,
            backend=backend,
            on_progress=on_progress,
        )
    config = lm.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    default_path = out_path is None
    if out_path is None:
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
