"""``kvcli presets`` and ``kvcli profile``: parse, call ``kvcli.profile`` / ``kvcli.estimate``, render."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .cli import (AttnOpt, BudgetOpt, ChunkOpt, DeviceOpt, DtypeOpt, ModelOpt, PresetOpt, QuietOpt, app, err)
from .errors import KvcliError

PRESET_ORDER = ("lossless", "balanced", "compact", "pod", "pod-compact", "streaming")
PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")
DEFAULT_PROFILE_BUDGET = "0.5"
MIB = 1024 * 1024


def _out() -> Console:
    """Tables on stdout; wide enough when piped (Rich assumes 80 columns otherwise)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(160, shutil.get_terminal_size((160, 24)).columns))
    return console


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1024 ** 3:
        return f"{n / 1024 ** 3:.2f} GiB"
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


# ---- presets ------------------------------------------------------------------------------------
def preset_rows() -> list[dict]:
    """Every built-in preset; one whose method is not available (yet) is listed as such."""
    import yaml

    from . import presets

    table = presets.builtin_presets()
    names = [n for n in PRESET_ORDER if n in table] + sorted(n for n in table if n not in PRESET_ORDER)
    rows = []
    for name in names:
        try:
            s = presets.load_preset(name)
            rows.append({"name": name, "method": s.method, "budget": str(s.budget), "chunk_size": s.chunk_size,
                         "options": s.options, "description": s.description, "available": True, "reason": ""})
        except KvcliError as exc:
            try:
                data = yaml.safe_load(table[name].read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                data = None
            data = data if isinstance(data, dict) else {}
            reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("preset ") else str(exc)
            rows.append({"name": name, "method": str(data.get("method", "?")), "budget": str(data.get("budget", "?")),
                         "chunk_size": data.get("chunk_size"), "options": data.get("options") or {},
                         "description": str(data.get("description", "")), "available": False, "reason": reason})
    return rows


@app.command("presets")
def presets_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print the presets as JSON on stdout.")] = False):
    """List the built-in budget presets (use one with --preset NAME)."""
    rows = preset_rows()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    w_name = max([len(r["name"]) for r in rows] + [6])
    w_method = max([len(r["method"]) for r in rows] + [6])
    print(f"{'preset':{w_name}s}  {'method':{w_method}s}  {'budget':6s}  description")
    for r in rows:
        note = "" if r["available"] else f"  [unavailable: {r['reason']}]"
        print(f"{r['name']:{w_name}s}  {r['method']:{w_method}s}  {r['budget']:6s}  {r['description']}{note}")


# ---- profile --------------------------------------------------------------------------------------
def _method_list(methods: str | None, default: list[str]) -> list[str]:
    from .methods import method_names

    if methods is None:
        return default
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise KvcliError("--methods: give one or more method names separated by commas")
    valid = method_names()
    for m in names:
        if m not in valid:
            raise KvcliError(f"--methods: unknown method {m!r}; valid methods: {', '.join(valid)}")
    return list(dict.fromkeys(names))


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


def _estimate_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bfloat16"
    if device == "cpu":
        return "float32"
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def _config_for(model: str):
    from .estimate import load_config

    if model == "embedded":
        from .models import _CONVERTED_DIR, cache_dir

        path = cache_dir() / "models" / _CONVERTED_DIR
        if not (path / "config.json").exists():
            raise KvcliError("--estimate: the embedded model is not converted yet (run any kvcli command once), "
                             "or give --model CONFIG.json")
        return load_config(path), path
    path = Path(model).expanduser()
    if not path.exists():
        try:  # a hub id already in the local Hugging Face cache (never downloads)
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True, allow_patterns=["config.json"]))
        except Exception:
            raise KvcliError(f"--model {model}: no such file or directory, and not in the local Hugging Face cache") from None
    return load_config(path), path


def _estimate(model, tokens, doc, methods, budget, chunk, options, dtype, device, per_layer, as_json, plot):
    from .estimate import cache_shape, estimate_kv_bytes

    config, path = _config_for(model)
    dt = _estimate_dtype(dtype, device)
    if doc is not None:
        from transformers import AutoTokenizer

        from . import api

        tok_dir = path if path.is_dir() else path.parent
        try:
            tok = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception:
            raise KvcliError(f"--estimate --doc: no tokenizer next to {path} to count the document's tokens; "
                             "give --context N instead") from None
        n = len(tok.encode(api.open_document(doc).text, add_special_tokens=False)) + 1
        tokens = min(tokens, n) if tokens else n
    tokens = tokens or 8192
    shape = cache_shape(config, dt)
    rows = [estimate_kv_bytes(config, tokens, m, "1" if m == "full" else budget, dt, chunk, options.get(m))
            for m in methods]
    for r in rows:
        r["model"] = str(path)
    max_pos = getattr(shape.config, "max_position_embeddings", None)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        out = _out()
        grow = len(shape.growing_indices)
        slide = len(shape.layer_kinds) - grow
        layout = f"{len(shape.layer_kinds)} layers ({grow} full attention" + (
            f", {slide} sliding window {shape.sliding_window})" if slide else ")")
        table = Table(title=f"ESTIMATE, from the configuration only (no weights loaded): {path}",
                      caption=f"{layout}; {shape.num_kv_heads} KV head(s) x head_dim {shape.head_dim}; {dt}; "
                              f"chunk {rows[0]['chunk_size']}; batch 1. KV cache only (keys, values and per-entry "
                              "metadata); weights and activations are not included.", title_justify="left")
        for col in ("method", "budget", "context tokens"):
            table.add_column(col)
        for col in ("KV after prefill", "% of full", "KV peak in prefill", "entries per full layer"):
            table.add_column(col, justify="right")
        for r in rows:
            kept = sorted(set(r["kept_tokens"]))
            table.add_row(r["method"], r["budget"], f"{r['context_tokens']:,}", _size(r["kv_bytes"]),
                          f"{100 * r['kv_ratio']:.1f}%", _size(r["peak_prefill_kv_bytes"]),
                          ", ".join(f"{k:,}" for k in kept) or "-")
        out.print(table)
        if per_layer:
            _per_layer_table(out, rows, [r["per_layer"] for r in rows], estimate=True)
        if max_pos and tokens > max_pos:
            err.print(f"[yellow]note:[/] {tokens:,} tokens exceed the model's {max_pos:,} positions")
    if plot:
        from .profile import plot_rows

        plot_rows(rows, plot, title=f"estimate: {Path(str(path)).name}, budget {budget}")


def _per_layer_table(out: Console, rows: list[dict], layers: list[list[dict]], estimate: bool = False) -> None:
    table = Table(title="KV bytes per layer" + (" (estimate)" if estimate else ""), title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("kind")
    for r in rows:
        table.add_column(r["method"], justify="right")
    n = max((len(l) for l in layers), default=0)
    for i in range(n):
        kind = next((l[i]["kind"] for l in layers if i < len(l)), "")
        cells = [_size(l[i]["bytes"]) if i < len(l) else "-" for l in layers]
        table.add_row(str(i), "full" if kind == "growing" else kind, *cells)
    out.print(table)


def _measured_layers(row: dict) -> list[dict]:
    grow = set(row.get("compressed_layers") or [])
    return [{"kind": "growing" if i in grow else "sliding", "bytes": b}
            for i, b in enumerate(row.get("kv_bytes_all_layers") or [])]


def _results_table(out: Console, rows: list[dict], title: str, caption: str) -> None:
    cuda = any(r.get("cuda_peak_bytes") for r in rows)
    odd = any(r.get("status") != "ok" for r in rows)
    table = Table(title=title, caption=caption, title_justify="left")
    table.add_column("method")
    table.add_column("budget")
    for col in ("tokens", "KV cache", "% of full", "peak RSS", "RSS over model") + (("CUDA peak",) if cuda else ()) + (
            "prefill tok/s", "TTFT s", "decode tok/s"):
        table.add_column(col, justify="right")
    if odd:
        table.add_column("status")
    for r in rows:
        ratio = r.get("kv_ratio")
        peak, base = r.get("peak_rss_bytes"), r.get("rss_baseline_bytes")
        cells = [r["method"], str(r.get("budget", "-")), _num(r.get("tokens")), _size(r.get("kv_bytes")),
                 "-" if ratio is None else f"{100 * ratio:.1f}%", _size(peak),
                 "-" if peak is None or base is None else "+" + _size(max(0, peak - base))]
        if cuda:
            cells.append(_size(r.get("cuda_peak_bytes")))
        cells += [_num(r.get("prefill_tokens_per_second")), _num(r.get("ttft_seconds"), "{:.2f}"),
                  _num(r.get("decode_tokens_per_second"), "{:.1f}")]
        if odd:
            cells.append(r.get("status", "ok") if r.get("status") != "error" else "error (see below)")
        table.add_row(*cells)
    out.print(table)


class _Progress:
    """Per-method progress lines on stderr."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = None
        if enabled:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)
        self.tasks: dict[str, int] = {}
        self.t0: dict[str, float] = {}

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, event: str, method: str, data) -> None:
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
            r = data
            info = (f"KV {_size(r.get('kv_bytes'))}, {_num(r.get('prefill_tokens_per_second'))} tok/s"
                    if r.get("status") == "ok" else r.get("status", ""))
            self.bar.update(task, info=info)


@app.command()
def profile(
    budget: BudgetOpt = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods to compare (default: every method, or the preset's).")] = None,
    preset: PresetOpt = None,
    doc: Annotated[Optional[str], typer.Option("--doc", help="Profile on this document (default: a generated haystack).")] = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", "--context", help="Tokens to process (default 8192; with --doc, the whole document).")] = None,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    chunk_size: ChunkOpt = None,
    attn: AttnOpt = "auto",
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Tokens to decode greedily after a short question.")] = 32,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also break KV bytes down by layer.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows (one per method) as a JSON list on stdout.")] = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Draw KV bytes and memory against tokens processed to FILE.png.")] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Plan only: KV memory each method would need, from the model's config.json alone (no weights loaded).")] = False,
    isolate: Annotated[bool, typer.Option("--isolate/--no-isolate", help="Run each method in a fresh process so its peak memory is its own (default); --no-isolate is faster to start, memory less exact.")] = True,
    quiet: QuietOpt = False,
):
    """Measure memory and speed of each method on one document (or --estimate from a config)."""
    from .methods import make_method, method_names
    from .presets import resolve_settings

    settings = resolve_settings(preset=preset, budget=budget, chunk_size=chunk_size)
    budget_s = budget if budget is not None else (str(settings.budget) if preset else DEFAULT_PROFILE_BUDGET)
    from .budget import parse_budget

    budget_s = str(parse_budget(budget_s))
    names = _method_list(methods, [settings.method] if preset else method_names())
    options = {settings.method: dict(settings.options)} if preset else {}
    for m in names:
        make_method(m, **options.get(m, {}))  # a bad method or option fails before any work
    if tokens is not None and tokens < 1:
        raise KvcliError(f"invalid --tokens {tokens}: it must be a positive number of tokens")
    if decode_tokens < 0:
        raise KvcliError(f"invalid --decode-tokens {decode_tokens}: it must be 0 or more")
    _check_plot(plot)

    if estimate:
        _estimate(model, tokens, doc, names, budget_s, settings.chunk_size, options, dtype, device, per_layer,
                  as_json, plot)
        return
    _measure(model, tokens, doc, names, budget_s, settings.chunk_size, options, dtype, device, attn, decode_tokens,
             per_layer, as_json, plot, isolate, quiet)


def _measure(model, tokens, doc, names, budget, chunk, options, dtype, device, attn, decode_tokens, per_layer,
             as_json, plot, isolate, quiet):
    from . import api
    from .backends import resolve_backend
    from .models import resolve_device, resolve_dtype
    from .profile import DEFAULT_TOKENS, ProfileSpec, default_document, first_tokens, plot_rows, run_profile

    dev = resolve_device(device)
    resolve_dtype(dtype, dev)
    backend = resolve_backend(attn, device)
    lm = None
    if isolate:
        tokenizer = _tokenizer(model, quiet)
    else:
        lm = api.load_model(model, device=device, dtype=dtype, quiet=quiet)
        tokenizer = lm.tokenizer
    if doc is not None:
        text = api.open_document(doc).text
        if tokens is not None:
            text = first_tokens(tokenizer, text, tokens)
        source = doc
    else:
        text = default_document(tokenizer, tokens or DEFAULT_TOKENS)
        source = f"generated haystack ({tokens or DEFAULT_TOKENS} tokens)"
    spec = ProfileSpec(document=text, methods=names, budget=budget, chunk_size=chunk, options=options,
                       decode_tokens=decode_tokens, model=model, device=device, dtype=dtype, backend=backend)
    with _Progress(not quiet) as progress:
        result = run_profile(spec, lm=lm, isolate=isolate, on_event=progress)
    rows = result.rows
    for r in rows:
        r["document"] = source
        r["isolated"] = isolate
    if as_json:
        print(json.dumps(rows, indent=2))
    elif rows:
        out = _out()
        first = next((r for r in rows if r.get("model")), {})
        caption = (f"{first.get('model', model)} on {first.get('device', device)}, {first.get('dtype', dtype)}; "
                   f"chunk {chunk}; {decode_tokens} decoded tokens. Peak RSS: "
                   + ("each method in a fresh process" if isolate else "all methods in this process")
                   + " (weights included); RSS over model: above the RSS after loading. "
                   "TTFT: prefill + question + first token.")
        _results_table(out, rows, f"kvcli profile: {source}", caption)
        if per_layer:
            ok = [r for r in rows if r.get("kv_bytes_all_layers")]
            _per_layer_table(out, ok, [_measured_layers(r) for r in ok])
    for r in rows:
        if r.get("status") == "error":
            err.print(f"[red]kvcli: error:[/] {r.get('error')}", highlight=False, soft_wrap=True)
    if plot and rows:
        plot_rows(rows, plot, title=f"{rows[0].get('model', model)}, budget {budget}")
        if not quiet:
            err.print(f"plot written to {plot}", highlight=False)
    if result.interrupted:
        err.print("kvcli: interrupted; the results above are what was measured so far", highlight=False)
        raise typer.Exit(130)


def _tokenizer(model: str, quiet: bool):
    """The tokenizer alone (the parent process needs no weights in isolated mode)."""
    from transformers import AutoTokenizer

    from .models import embedded_model_dir

    path = str(embedded_model_dir(quiet=quiet)) if model == "embedded" else str(Path(model).expanduser())
    if model != "embedded" and not os.path.isdir(path) and os.path.exists(path):
        raise KvcliError(f"--model {model}: expected a model directory, got a file")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise KvcliError(f"--model {model}: cannot load its tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
