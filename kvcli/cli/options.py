"""What every command shares: the option definitions, their parsing, the error console and
the one progress factory.  Light on purpose (no torch): ``kvcli --help`` imports it.

Flag names live here and in the command modules only.  Library errors name parameters
(``KvcliError.option``); ``error_line`` puts the flag in their place.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Self

import typer
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..core import defaults
from ..core.errors import KvcliError

err = Console(stderr=True)

# ---- the shared options ---------------------------------------------------------------------------
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        help="'embedded' (Gemma 3 270M) or 'smollm2' (SmolLM2 135M Instruct), both from PyPI (see `kvcli models`), "
        "a local HF model directory, or a hub id in the local HF cache.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto picks CUDA when present).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")]
MethodOpt = Annotated[str | None, typer.Option("--method", "-m", help="Compression method (see `kvcli methods`).")]
MethodsOpt = Annotated[str | None, typer.Option("--methods", help="Comma-separated methods (see `kvcli methods`).")]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        "-b",
        help="Ratio in (0, 1] of tokens seen, or a token count (integer > 1), optionally with the allocation: "
        "0.5:auto (the default: each method's measured best), 0.5:heads, 0.5:relative, 0.5:global or 0.5:uniform.",
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option(
        "--preset", "-p", help="Preset name (see `kvcli presets`) or a YAML file; explicit flags override it."
    ),
]
ChunkOpt = Annotated[
    int | None,
    typer.Option(
        "--chunk-size",
        help=f"Prefill chunk size in tokens, 16 or more (default {defaults.CHUNK_SIZE}, chosen by measurement).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
MaxNewOpt = Annotated[
    int | None, typer.Option("--max-new-tokens", help="Most tokens to generate per answer (1 or more).")
]
TempOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy (default); > 0 samples.")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold (with --temperature).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed for sampling.")]
TruncOpt = Annotated[
    bool,
    typer.Option(
        "--truncate",
        help="If the document exceeds the model's positions, keep its first tokens (says how many were dropped).",
    ),
]
ScoringOpt = Annotated[
    str | None,
    typer.Option(
        "--scoring",
        help="Where scored methods get their statistics: auto (default: reconstruction, which serves any later "
        "question), recon, question (the budget then shared uniformly by the layers), recon+question, window.",
    ),
]
AllocationOpt = Annotated[
    str | None,
    typer.Option(
        "--allocation",
        help="How the growing layers share the budget: auto (the default: each method's measured best, relative "
        "for snapkv, heads for the other scored methods; docs/scoring.md), heads (entries of every layer and KV "
        "head ranked together, a layer keeping its neediest head's count), relative (the same, each score divided "
        "by the mean score of every entry its head has ranked, evicted ones included), global (the same "
        "ranking, a layer keeping its heads' mean) or uniform (each layer the same).",
    ),
]
NoAdapterOpt = Annotated[
    bool,
    typer.Option(
        "--no-adapter",
        help="PoD: run training-free, without the adapter `kvcli adapt` trained for this model (to compare).",
    ),
]
AttnOpt = Annotated[str, typer.Option("--attn", help="Attention backend: auto|sdpa|flash|triton.")]
OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-o",
        help="Method option KEY=VALUE (repeatable), e.g. -o threshold=0.8; a plain KEY goes to every chosen method "
        "that has it, METHOD.KEY to one.",
    ),
]

#: Library parameter -> the flag that sets it (``KvcliError.option``).
FLAGS = {
    "model": "--model",
    "device": "--device",
    "dtype": "--dtype",
    "backend": "--attn",
    "budget": "--budget",
    "budgets": "--budgets",
    "chunk_size": "--chunk-size",
    "truncate": "--truncate",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "option": "--option",
    "n_blocks": "--blocks",
    "methods": "--methods",
    "lengths": "--lengths",
    "samples": "--samples",
}


def error_line(exc: KvcliError) -> str:
    """The one line a user sees: a message that starts with the parameter it is about names
    the flag instead (``backend 'x' is unknown`` -> ``--attn 'x' is unknown``)."""
    text, name = str(exc), exc.option
    flag = FLAGS.get(name) if name else None
    if flag and name and (text.startswith(name + " ") or text.startswith(name + ":")):
        return flag + text[len(name) :]
    return text


# ---- parsing ----------------------------------------------------------------------------------------
def parse_list(value: str | None, flag: str) -> list[str]:
    """A comma-separated flag value as a list (blank items dropped); empty is an error."""
    if value is None:
        return []
    out = [p.strip() for p in value.split(",") if p.strip()]
    if not out:
        raise KvcliError(f"{flag}: empty list")
    return out


def parse_methods(value: str | None, default: list[str]) -> list[str]:
    """``--methods a,b``: known method names, each once, in the order given."""
    from ..methods import method_names  # imports torch: only when a command runs

    if value is None:
        return list(default)
    names = parse_list(value, "--methods")
    valid = method_names()
    for m in names:
        if m not in valid:
            raise KvcliError(f"--methods: unknown method {m!r}; valid methods: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def adapter_off(method: str) -> dict[str, Any]:
    """``--no-adapter``: the option that turns PoD's adapter off for ``method`` (none for a
    method without one), keyed as ``resolve_settings`` keys a method's options."""
    from ..methods import has_option, normalize_options, split_options

    if not has_option(method, "adapter"):
        return {}
    return normalize_options(method, split_options({"adapter": "none"}, [method])[method])


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs as a dict; values are read as YAML scalars/lists (``0.8``, ``[[0, 1]]``)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise KvcliError(f"invalid --option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvcliError(f"invalid --option {pair!r}: cannot parse the value") from None
    return out


# ---- display -----------------------------------------------------------------------------------------
def progress(enabled: bool, unit: str = "", eta: bool = False) -> Progress | None:
    """The progress display every command uses (on stderr): ``description``, a bar, done/total
    ``unit``, the task's ``info`` field, elapsed time (and the remaining time with ``eta``).
    ``None`` when disabled; add tasks with ``info=""``."""
    if not enabled:
        return None
    columns: list[str | ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    if eta:
        columns += [TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=err, transient=False)


class ProgressView:
    """A ``progress`` display fed by a library callback (subclasses define ``__call__``):
    ``with View(not quiet) as view: run(..., on_progress=view)``."""

    def __init__(self, enabled: bool, unit: str = "") -> None:
        self.bar = progress(enabled, unit)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Self:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def emit(text: str) -> None:
    """Answer text on stdout as it is generated."""
    sys.stdout.write(text)
    sys.stdout.flush()


def note(text: str) -> None:
    err.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True)
