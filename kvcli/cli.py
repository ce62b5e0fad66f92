"""The command line: parse, call the library, render.  Nothing here computes anything."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import KvcliError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long documents through a language model on limited memory (chunked prefill + KV-cache compression).",
)
err = Console(stderr=True)

# ---- shared options -------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", help="'embedded' (Gemma 3 270M from PyPI), a local HF model directory, or a hub id in the local HF cache.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto picks CUDA when present).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")]
MethodOpt = Annotated[Optional[str], typer.Option("--method", "-m", help="Compression method (see `kvcli methods`).")]
BudgetOpt = Annotated[Optional[str], typer.Option("--budget", "-b", help="Ratio in (0, 1] of tokens seen, or a token count (integer > 1).")]
PresetOpt = Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `kvcli presets`) or a YAML file; explicit flags override it.")]
ChunkOpt = Annotated[Optional[int], typer.Option("--chunk-size", help="Prefill chunk size in tokens (default 512, chosen by measurement).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
MaxNewOpt = Annotated[Optional[int], typer.Option("--max-new-tokens", help="Most tokens to generate per answer.")]
TempOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (with --temperature).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for sampling.")]
TruncOpt = Annotated[bool, typer.Option("--truncate", help="If the document exceeds the model's positions, keep its first tokens (says how many were dropped).")]
AttnOpt = Annotated[str, typer.Option("--attn", help="Attention backend: auto|sdpa|flash|triton.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", "-o", help="Method option KEY=VALUE (repeatable), e.g. -o threshold=0.8.")]


def _progress(quiet: bool):
    if quiet:
        return None
    return Progress(
        TextColumn("[bold]prefill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _run_prefill(document: str, model: str, device: str, dtype: str, method, budget, preset, chunk_size, truncate,
                 quiet: bool, attn: str, options, question: str | None = None, query_aware: bool = False):
    from . import api
    from .backends import resolve_backend
    from .presets import resolve_settings

    settings = resolve_settings(preset=preset, method=method, budget=budget, chunk_size=chunk_size, options=options)
    doc = api.open_document(document)
    backend = resolve_backend(attn, device)
    if settings.method == "pod" and not settings.budget.is_full and not quiet:
        err.print("[yellow]note:[/] pod keeps every token (its saving is the shared distant keys); "
                  "--budget applies to pod+kvmerger and pod+snapkv, ignored here")
    lm = api.load_model(model, device=device, dtype=dtype, quiet=quiet)
    progress = _progress(quiet)
    import time

    t0 = time.perf_counter()
    if progress is None:
        ctx = api.prefill(lm, doc, method=settings.method, budget=settings.budget, chunk_size=settings.chunk_size,
                          truncate=truncate, method_options=settings.options, backend=backend,
                          question=question if query_aware else None)
    else:
        with progress:
            task = progress.add_task("prefill", total=None, rate="")

            def on_chunk(done: int, total: int) -> None:
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=done, total=total, rate=f"{rate:,.0f} tok/s")

            ctx = api.prefill(lm, doc, method=settings.method, budget=settings.budget, chunk_size=settings.chunk_size,
                              truncate=truncate, method_options=settings.options, backend=backend,
                              question=question if query_aware else None, on_progress=on_chunk)
    if ctx.truncated and not quiet:
        err.print(f"[yellow]note:[/] document truncated: kept the first {ctx.context_tokens} tokens, dropped {ctx.truncated}")
    return ctx


def _sampler(temperature: float, top_p: float, seed: int | None):
    from .engine import Sampler

    if temperature < 0:
        raise KvcliError(f"invalid --temperature {temperature}: it must be >= 0")
    if not 0 < top_p <= 1:
        raise KvcliError(f"invalid --top-p {top_p}: it must be in (0, 1]")
    return Sampler(temperature=temperature, top_p=top_p, seed=seed)


def _emit(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def ask(
    document: Annotated[str, typer.Argument(help="Document: .txt .md .pdf .html, or - for stdin.")],
    questions: Annotated[list[str], typer.Argument(help="One or more questions; the document is prefilled once.")],
    model: ModelOpt = "embedded",
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    query_aware: Annotated[bool, typer.Option("--query-aware/--no-query-aware", help="With a single question, let the method score context entries by the attention the question pays them (default: off; see README).")] = False,
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
):
    """Answer questions about a document."""
    if query_aware and len(questions) != 1:
        raise KvcliError("--query-aware needs exactly one question (the question must be known before prefill)")
    sampler = _sampler(temperature, top_p, seed)
    ctx = _run_prefill(document, model, device, dtype, method, budget, preset, chunk_size, truncate, quiet or as_json,
                       attn, option, question=questions[0], query_aware=query_aware)
    results = []
    for i, q in enumerate(questions):
        stream = None
        if not as_json:
            if len(questions) > 1:
                _emit(f"{'' if i == 0 else chr(10)}Q: {q}\nA: ")
            stream = _emit
        ans = ctx.ask(q, max_new_tokens=max_new_tokens or 64, sampler=sampler, on_text=stream)
        if not as_json:
            _emit("\n")
        results.append({"question": q, "answer": ans.text})
    if as_json:
        print(json.dumps({"answers": results, **ctx.report()}, indent=2))


@app.command()
def summarize(
    document: Annotated[str, typer.Argument(help="Document: .txt .md .pdf .html, or - for stdin.")],
    model: ModelOpt = "embedded",
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
):
    """Summarize a document."""
    sampler = _sampler(temperature, top_p, seed)
    ctx = _run_prefill(document, model, device, dtype, method, budget, preset, chunk_size, truncate, quiet or as_json,
                       attn, option)
    ans = ctx.summarize(max_new_tokens=max_new_tokens or 200, sampler=sampler, on_text=None if as_json else _emit)
    if as_json:
        print(json.dumps({"summary": ans.text, **ctx.report()}, indent=2))
    else:
        _emit("\n")


@app.command()
def methods():
    """List the compression methods."""
    from .methods import COMPOSITES, REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name:16s} {cls.description}")
    for name in COMPOSITES:
        inner = name.split("+", 1)[1]
        print(f"{name:16s} PoD, with distant tokens compressed further by {inner} to the budget")


# ---- commands that live in their own modules (each adds itself to ``app``) --------------------
# (import lines are added here as those modules land)
from . import cli_calibrate  # noqa: E402,F401
from . import cli_eval  # noqa: E402,F401
from . import cli_profile  # noqa: E402,F401


def main() -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit."""
    import click

    try:
        app(standalone_mode=False)
    except KvcliError as exc:
        err.print(f"[red]kvcli: error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        err.print(f"[red]kvcli: error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        err.print("kvcli: interrupted", highlight=False)
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("kvcli: interrupted", highlight=False)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # never a traceback for the user; KVCLI_DEBUG=1 shows it
        if os.environ.get("KVCLI_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(f"[red]kvcli: internal error:[/] {type(exc).__name__}: {msg} (set KVCLI_DEBUG=1 for details)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
