"""``kvcli models``: the models kvcli knows, from their configurations (no weights loaded)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .options import DtypeOpt


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


def models(
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the models as JSON on stdout.")] = False,
) -> None:
    """List the models kvcli knows: the embedded ones and local folders used before.

    KV bytes per token count the layers whose cache grows with the document, at --dtype
    (auto: what a run would use here). Nothing is loaded, converted or downloaded."""
    from ..engine.models import list_models, resolve_device, resolve_dtype

    name = str(resolve_dtype(dtype, resolve_device("auto"))).removeprefix("torch.")
    rows = list_models(name)
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    header = ["model", "architecture", "layers", "growing", "sliding", "heads q/kv", "head_dim", "positions"]
    header += [f"KV/token ({name})", "converted", "on disk"]
    lines = [header]
    for r in rows:
        if r.error:
            lines.append([r.name, f"error: {r.error}"])
            continue
        sliding = f"{r.sliding_layers} (window {r.sliding_window})" if r.sliding_layers else "0"
        converted = "local" if r.converted is None else ("yes" if r.converted else "no (on first use)")
        size = human_bytes(r.size_bytes) if r.size_bytes else "-"
        lines.append(
            [r.name, r.architecture, str(r.layers), str(r.growing_layers), sliding, f"{r.query_heads}/{r.kv_heads}"]
            + [str(r.head_dim), f"{r.max_positions:,}", human_bytes(r.kv_bytes_per_token), converted, size]
        )
    full = [ln for ln in lines if len(ln) == len(header)]
    widths = [max(len(ln[i]) for ln in full) for i in range(len(header))]
    for ln in lines:
        if len(ln) != len(header):
            print(f"{ln[0]:{widths[0]}s}  {ln[1]}")
            continue
        print(
            "  ".join(
                c.rjust(w) if i >= 2 and i != 9 else c.ljust(w) for i, (c, w) in enumerate(zip(ln, widths, strict=True))
            ).rstrip()
        )
    for r in rows:
        if r.kind == "local" and r.name != r.path:
            print(f"{r.name}: {r.path}")
    adapted = [r for r in rows if r.adapters]
    for r in adapted:
        for a in r.adapters:
            members = sum(len(b) - 1 for b in a["blocks"])
            print(
                f"adapter for {r.name}: {a['path']} ({len(a['blocks'])} blocks, {members} member layers, "
                f"rank {a['rank']}, {a['steps']} steps; --method pod uses it)"
            )
