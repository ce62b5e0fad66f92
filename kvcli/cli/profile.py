"""``kvcli profile``: parse, call ``kvcli.profile`` (measured) or ``kvcli.profile.estimate``
(planned), render."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..core import defaults
from ..core.errors import KvcliError
from . import checks
from .common import load_model
from .config import load_defaults
from .eta import Eta, minutes_text, work_text
from .options import (
    AttnOpt,
    BudgetOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    OptionOpt,
    PresetOpt,
    ProgressView,
    QuietOpt,
    err,
    parse_methods,
    parse_options,
)

if TYPE_CHECKING:  # annotations only: the command body imports the library when it runs
    from ..profile.estimate import EstimateResult, EstimateSpec
    from ..profile.profile import ProfileRow, ProfileSpec

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
MIB = 1024 * 1024


@dataclass
class View:
    """How to show a profile: what the rendering flags asked for."""

    per_layer: bool = False
    as_json: bool = False
    plot: str | None = None
    quiet: bool = False


def _out() -> Console:
    """Tables on stdout; wide enough when piped (Rich assumes 80 columns otherwise)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(160, shutil.get_terminal_size((160, 24)).columns))
    return console


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _check_plot(plot: str | None) -> None:
    if plot is None:
        return
    path = Path(plot)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise KvcliError(f"--plot {plot}: give a file name ending in {', '.join(PLOT_SUFFIXES)}")
    if not path.resolve().parent.is_dir():
        raise KvcliError(f"--plot {plot}: directory {path.resolve().parent} does not exist")
    if path.is_dir():
        raise KvcliError(f"--plot {plot}: is a directory")


#: Without ``max_position_embeddings`` in the configuration, the longest context estimated.
#: (The estimate replays the prefill chunk by chunk: its time grows with the context.)
MAX_ESTIMATE_CONTEXT = 1 << 20


def _max_positions(config: Any) -> int:
    """The model's positions from a transformers config or a raw ``config.json`` dict (a
    multimodal config keeps them in its ``text_config``); 0 when it does not say."""
    for cfg in (
        config,
        getattr(config, "text_config", None) if not isinstance(config, dict) else config.get("text_config"),
    ):
        value = (
            cfg.get("max_position_embeddings")
            if isinstance(cfg, dict)
            else getattr(cfg, "max_position_embeddings", None)
        )
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _check_context(tokens: int, config: Any, path: Path) -> None:
    """Refuse a context the model cannot hold, before the estimate replays it."""
    limit = _max_positions(config)
    if limit and tokens > limit:
        raise KvcliError(
            f"--context {tokens:,} is more than the model's {limit:,} positions (max_position_embeddings in {path})"
        )
    if not limit and tokens > MAX_ESTIMATE_CONTEXT:
        raise KvcliError(
            f"--context {tokens:,}: {path} does not give max_position_embeddings; contexts above "
            f"{MAX_ESTIMATE_CONTEXT:,} tokens are refused"
        )


# ---- tables -------------------------------------------------------------------------------------
def _per_layer_table(
    out: Console, methods: list[str], layers: list[list[tuple[str, int]]], estimate: bool = False
) -> None:
    """One column per method: bytes of each layer (``layers[m][i]`` = (kind, bytes))."""
    table = Table(title="KV bytes per layer" + (" (estimate)" if estimate else ""), title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("kind")
    for m in methods:
        table.add_column(m, justify="right")
    n = max((len(col) for col in layers), default=0)
    for i in range(n):
        kind = next((col[i][0] for col in layers if i < len(col)), "")
        cells = [_size(col[i][1]) if i < len(col) else "-" for col in layers]
        table.add_row(str(i), "full" if kind == "growing" else kind, *cells)
    out.print(table)


def _measured_layers(row: ProfileRow) -> list[tuple[str, int]]:
    grow = set(row.compressed_layers or [])
    return [("growing" if i in grow else "sliding", b) for i, b in enumerate(row.kv_bytes_all_layers or [])]


def _results_table(out: Console, rows: Sequence[ProfileRow], title: str, caption: str) -> None:
    cuda = any(r.cuda_peak_bytes for r in rows)
    odd = any(r.status != "ok" for r in rows)
    table = Table(title=title, caption=caption, title_justify="left")
    table.add_column("method")
    table.add_column("budget")
    columns = ["tokens", "KV cache", "% of full", "peak RSS", "RSS over model"] + (["CUDA peak"] if cuda else [])
    for col in [*columns, "prefill tok/s", "TTFT s", "decode tok/s"]:
        table.add_column(col, justify="right")
    if odd:
        table.add_column("status")
    for r in rows:
        peak, base = r.peak_rss_bytes, r.rss_baseline_bytes
        cells = [
            r.method,
            r.budget,
            _num(r.tokens),
            _size(r.kv_bytes),
            "-" if r.kv_ratio is None else f"{100 * r.kv_ratio:.1f}%",
            _size(peak),
            "-" if peak is None or base is None else "+" + _size(max(0, peak - base)),
        ]
        if cuda:
            cells.append(_size(r.cuda_peak_bytes))
        cells += [
            _num(r.prefill_tokens_per_second),
            _num(r.ttft_seconds, "{:.2f}"),
            _num(r.decode_tokens_per_second, "{:.1f}"),
        ]
        if odd:
            cells.append(r.status if r.status != "error" else "error (see below)")
        table.add_row(*cells)
    out.print(table)


DTYPE_SOURCE = {"requested": "--dtype", "config": "from the configuration", "device": "kvcli's default on this device"}


def _estimate_table(out: Console, result: EstimateResult) -> None:
    shape, rows = result.shape, result.rows
    dtype = f"{result.dtype} ({DTYPE_SOURCE[result.dtype_source]})"
    grow = len(shape.growing_indices)
    slide = len(shape.layer_kinds) - grow
    layout = f"{len(shape.layer_kinds)} layers ({grow} full attention" + (
        f", {slide} sliding window {shape.sliding_window})" if slide else ")"
    )
    table = Table(
        title=f"ESTIMATE, from the configuration only (no weights loaded): {result.path}",
        caption=f"{layout}; {shape.num_kv_heads} KV head(s) x head_dim {shape.head_dim}; {dtype}; "
        f"chunk {rows[0].chunk_size}; batch 1. KV cache only (keys, values and per-entry "
        "metadata); weights and activations are not included.",
        title_justify="left",
    )
    for col in ("method", "budget", "context tokens"):
        table.add_column(col)
    for col in ("KV after prefill", "% of full", "KV peak in prefill", "entries per full layer"):
        table.add_column(col, justify="right")
    for r in rows:
        kept = sorted(set(r.kept_tokens))
        table.add_row(
            r.method,
            r.budget,
            f"{r.context_tokens:,}",
            _size(r.kv_bytes),
            f"{100 * r.kv_ratio:.1f}%",
            _size(r.peak_prefill_kv_bytes),
            ", ".join(f"{k:,}" for k in kept) or "-",
        )
    out.print(table)


class ProfileProgress(ProgressView):
    """Per-method progress lines on stderr (``run_profile``'s ``on_event``), and an overall
    line whose ETA is computed from the work done (``Eta``): process starts, prefill tokens,
    decoded tokens, each at the speed measured so far."""

    def __init__(self, enabled: bool, eta: Eta, decode_tokens: int, scored: Sequence[str] = ()) -> None:
        super().__init__(enabled)
        self.t0: dict[str, float] = {}
        self.eta = eta
        self.decode_tokens = decode_tokens
        self.scored = set(scored)  # methods whose prefill includes scoring passes
        self.tokens = 0
        self.finished = 0
        self.overall = None if self.bar is None else self.bar.add_task("overall", total=eta.totals["start"], info="")

    def _overall(self) -> None:
        if self.bar is not None and self.overall is not None:
            done = self.finished >= self.eta.totals["start"]
            self.bar.update(self.overall, completed=self.finished, info="done" if done else self.eta.text())

    def __call__(self, event: str, method: str, data: Any) -> None:
        if event == "loaded":
            self.eta.record("start", 1)
            if data is not None:  # the first process timed chunks and a few decode steps
                prefill, decode, scored = data
                self.eta.prior.update(prefill=prefill, decode=decode, scored=scored or prefill)
                if self.bar is not None:
                    rates = f"{1 / prefill:,.0f} tok/s prefill" + (
                        f" ({1 / scored:,.0f} with scoring)" if scored and self.scored else ""
                    )
                    self.bar.console.print(
                        f"Estimate: {minutes_text(self.eta.planned_seconds() or 0)} at the speed measured now "
                        f"({self.eta.rate('start'):.1f} s to start a process, {rates}, {1 / decode:,.1f} tok/s decode)",
                        highlight=False,
                    )
        elif event == "chunk":
            self.eta.record("scored" if method in self.scored else "prefill", data[0] - self.tokens)
            self.tokens = data[0]
        elif event == "done":
            self.eta.record("decode", self.decode_tokens)
            self.tokens = 0
            self.finished += 1
        if self.bar is None:
            return
        if event == "start":
            self.tasks[method] = self.bar.add_task(f"{method:14s}", total=None, info="loading the model")
        task = self.tasks.get(method)
        if task is None:
            return
        if event == "loaded":
            self.bar.update(task, info="prefill")
            self.t0[method] = time.perf_counter()
        elif event == "chunk":
            done, total = data
            rate = done / max(time.perf_counter() - self.t0.get(method, time.perf_counter()), 1e-9)
            self.bar.update(task, completed=done, total=total, info=f"prefill {rate:,.0f} tok/s")
        elif event == "done":
            r: ProfileRow = data
            info = (
                f"KV {_size(r.kv_bytes)}, {_num(r.prefill_tokens_per_second)} tok/s" if r.status == "ok" else r.status
            )
            self.bar.update(task, info=info)
        self._overall()


# ---- the command ---------------------------------------------------------------------------------
def profile(
    budget: BudgetOpt = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help=f"Comma-separated methods to compare (default: {', '.join(defaults.HEADLINE_METHODS)}, or the "
            "preset's; every method with --full or --estimate).",
        ),
    ] = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    doc: Annotated[
        str | None, typer.Option("--doc", help="Profile on this document (default: a generated haystack).")
    ] = None,
    tokens: Annotated[
        int | None,
        typer.Option(
            "--tokens",
            "--context",
            help=f"Tokens to process (default {defaults.PROFILE_TOKENS:,}; {defaults.PROFILE_FULL_TOKENS:,} with "
            "--full or --estimate; with --doc, the whole document).",
        ),
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help=f"The exhaustive run: every method on {defaults.PROFILE_FULL_TOKENS:,} tokens (explicit --methods / "
            "--tokens win).",
        ),
    ] = False,
    model: ModelOpt = defaults.MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    chunk_size: ChunkOpt = None,
    attn: AttnOpt = "auto",
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Tokens to decode greedily after a short question.")
    ] = defaults.PROFILE_DECODE_TOKENS,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also break KV bytes down by layer.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the rows (one per method) as a JSON list on stdout.")
    ] = False,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Draw KV bytes and memory against tokens processed to FILE.png.")
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Plan only: KV memory each method would need, from the model's config.json alone (no weights loaded).",
        ),
    ] = False,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate/--no-isolate",
            help="Run each method in a fresh process so its peak memory is its own (default); --no-isolate is faster "
            "to start, memory less exact.",
        ),
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Measure memory and speed of each method on one document (or --estimate from a config)."""
    from ..api.settings import resolve_settings
    from ..core.budget import parse_budget
    from ..methods import make_method, method_names, split_options

    checks.run_options(device, dtype, attn)
    if chunk_size is not None:
        checks.chunk_size("--chunk-size", chunk_size)
    elif preset is None:  # the environment's or the config file's, if either sets one (a preset's wins)
        value, source = load_defaults().get("chunk_size")
        chunk_size = value if source != "default" else None
    settings = resolve_settings(preset=preset, budget=budget, chunk_size=chunk_size)
    budget_s = str(
        parse_budget(budget if budget is not None else (str(settings.budget) if preset else defaults.PROFILE_BUDGET))
    )
    names = parse_methods(
        methods,
        [settings.method] if preset else method_names() if full or estimate else list(defaults.HEADLINE_METHODS),
    )
    options: dict[str, dict] = {m: {} for m in names}
    if preset and settings.method in options:
        options[settings.method].update(settings.options)
    for m, opts in split_options(parse_options(option), names).items():
        options[m].update(opts)
    for m in names:
        make_method(m, **options[m])  # a bad method or option fails before any work
    if tokens is not None and tokens < 1:
        raise KvcliError(f"invalid --tokens {tokens}: it must be a positive number of tokens")
    if decode_tokens < 0:
        raise KvcliError(f"invalid --decode-tokens {decode_tokens}: it must be 0 or more")
    _check_plot(plot)
    view = View(per_layer=per_layer, as_json=as_json, plot=plot, quiet=quiet)
    from ..profile.estimate import EstimateSpec
    from ..profile.profile import ProfileSpec

    if estimate:
        spec = EstimateSpec(
            methods=names,
            budget=budget_s,
            chunk_size=settings.chunk_size,
            options=options,
            model=model,
            dtype=dtype,
            device=device,
        )
        _estimate(spec, tokens, doc, view)
        return
    run = ProfileSpec(
        document="",
        methods=names,
        budget=budget_s,
        chunk_size=settings.chunk_size,
        options=options,
        decode_tokens=decode_tokens,
        model=model,
        device=device,
        dtype=dtype,
        backend=attn,
    )
    if tokens is None and doc is None:
        tokens = defaults.PROFILE_FULL_TOKENS if full else defaults.PROFILE_TOKENS
    _measure(run, doc, tokens, isolate, view)


def _estimate(spec: EstimateSpec, tokens: int | None, doc: str | None, view: View) -> None:
    from ..profile.estimate import config_path, document_tokens, estimate_all, load_config
    from ..profile.plot import plot_rows

    path = config_path(spec.model)
    if doc is not None:
        n = document_tokens(path, doc)
        tokens = min(tokens, n) if tokens else n
    spec.tokens = tokens or defaults.PROFILE_FULL_TOKENS
    _check_context(spec.tokens, load_config(path), path)
    result = estimate_all(spec)
    if view.as_json:
        print(json.dumps([r.as_dict() for r in result.rows], indent=2))
    else:
        out = _out()
        _estimate_table(out, result)
        if view.per_layer:
            _per_layer_table(
                out,
                [r.method for r in result.rows],
                [[(layer.kind, layer.bytes) for layer in r.per_layer] for r in result.rows],
                estimate=True,
            )
    if view.plot:
        plot_rows(result.rows, view.plot, title=f"estimate: {result.path.name}, budget {spec.budget}")


def _measure(spec: ProfileSpec, doc: str | None, tokens: int | None, isolate: bool, view: View) -> None:
    from ..attention.backends import resolve_backend
    from ..engine.models import load_tokenizer, resolve_device, resolve_dtype
    from ..methods import method_names
    from ..profile.plot import plot_rows
    from ..profile.profile import profile_text, run_profile, scored_methods

    resolve_dtype(spec.dtype, resolve_device(spec.device))
    spec.backend = resolve_backend(spec.backend, spec.device)
    lm = None
    if isolate:
        tokenizer = load_tokenizer(spec.model, quiet=view.quiet)
    else:
        lm = load_model(spec.model, spec.device, spec.dtype, view.quiet)
        tokenizer = lm.tokenizer
    spec.document, spec.source = profile_text(tokenizer, doc, tokens)
    n_tokens = len(tokenizer.encode(spec.document, add_special_tokens=False)) + 1  # and BOS
    what = (
        f"{spec.model} model, {len(spec.methods)} method{'s' if len(spec.methods) != 1 else ''} "
        f"({', '.join(spec.methods)}), budget {spec.budget}, {n_tokens:,} tokens of {doc or 'a generated haystack'}"
    )
    if not view.quiet:
        err.print(
            f"Profile: {what}. Plan: {work_text(len(spec.methods), [n_tokens])} + {spec.decode_tokens} decoded, "
            + ("each method in a fresh process." if isolate else "all in this process.")
            + ("" if len(spec.methods) >= len(method_names()) else " (--full: every method.)"),
            highlight=False,
            soft_wrap=True,
        )
    spec.calibrate = not view.quiet  # the estimate is for the display only
    scored = scored_methods(spec)
    n = len(spec.methods)
    totals = {"start": n, "prefill": n_tokens * (n - len(scored)), "scored": n_tokens * len(scored)}
    totals["decode"] = spec.decode_tokens * n
    with ProfileProgress(not view.quiet, Eta(totals), spec.decode_tokens, scored) as on_event:
        result = run_profile(spec, lm=lm, isolate=isolate, on_event=on_event)
    rows = result.rows
    if view.as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif rows:
        out = _out()
        first = next((r for r in rows if r.model), None)
        caption = (
            f"{first.model if first else spec.model} on {first.device if first else spec.device}, "
            f"{first.dtype if first else spec.dtype}; chunk {spec.chunk_size}; {spec.decode_tokens} decoded "
            "tokens. Peak RSS: "
            + ("each method in a fresh process" if isolate else "all methods in this process")
            + " (weights included); RSS over model: above the RSS after loading. "
            "TTFT: prefill + question + first token."
        )
        _results_table(out, rows, f"kvcli profile: {what}", caption)
        if view.per_layer:
            ok = [r for r in rows if r.kv_bytes_all_layers]
            _per_layer_table(out, [r.method for r in ok], [_measured_layers(r) for r in ok])
    for r in rows:
        if r.status == "error":
            err.print(f"[red]kvcli: error:[/] {r.error}", highlight=False, soft_wrap=True)
    if view.plot and rows:
        plot_rows(rows, view.plot, title=f"{rows[0].model or spec.model}, budget {spec.budget}")
        if not view.quiet:
            err.print(f"plot written to {view.plot}", highlight=False)
    if result.interrupted:
        err.print("kvcli: profile interrupted; the results above are what was measured so far", highlight=False)
        raise typer.Exit(130)  # ``main`` says "interrupted" and exits 130
