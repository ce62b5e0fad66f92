"""``kvcli info``: what a saved context (``.kvc``) holds, read from its header (no torch, no model).

The whole file is read and its checksum checked, so ``info`` also says whether the file is
whole: a truncated or corrupted one is the same one-line error ``ask`` would give.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..core import kvcfile
from ..core.errors import KvcliError
from .options import JsonOpt


def info(
    path: Annotated[str, typer.Argument(help="A saved context (.kvc), written by `kvcli compress`.")],
    as_json: JsonOpt = False,
) -> None:
    """Show what a saved context holds: model, method and options, budget, tokens, bytes, source."""
    p = Path(path)
    if p.is_file() and not kvcfile.looks_saved(p):
        raise KvcliError(f"{path} is a document, not a saved context (.kvc): make one with `kvcli compress {path}`")
    saved, _ = kvcfile.read(path)
    h = saved.header
    per_layer = saved.layer_bytes()
    tensor_bytes = sum(e.nbytes for e in saved.tensors.values())
    if as_json:
        out: dict[str, Any] = {
            "path": str(path),
            "file_bytes": saved.size,
            "tensor_bytes": tensor_bytes,
            "bytes_per_layer": per_layer,
            **{k: v for k, v in h.items() if k != "layers"},
            "layers": [dict(layer, bytes=b) for layer, b in zip(h["layers"], per_layer, strict=True)],
        }
        print(json.dumps(out, indent=2))
        return
    model = h["model"]
    options = ", ".join(f"{k}={_short(v)}" for k, v in h["method_options"].items())
    full = h["kv_bytes_full"]
    rows = [
        ("file", f"{path} ({saved.size:,} bytes; format {h['format_version']}, kvcli {h['kvcli_version']})"),
        ("created", h["created"]),
        ("model", f"{model['name']} (--model {model['ref']}), {h['dtype']}"),
        (
            "fingerprint",
            f"config {model['config_sha256'][:12]}, tokenizer {model['tokenizer_sha256'][:12]}, "
            f"weights {model['weights_sha256'][:12]}",
        ),
        ("method", f"{h['method']} ({options})" if options else h["method"]),
        ("budget", h["budget"]),
        ("scoring", h["scoring"] if h["scored"] else "none (the method scores nothing at this budget)"),
        ("chunk size", str(h["chunk_size"])),
        (
            "tokens",
            f"{h['context_tokens']:,}" + (f" ({h['truncated_tokens']:,} truncated)" if h["truncated_tokens"] else ""),
        ),
    ]
    for i, src in enumerate(h["sources"]):
        label = "source" if i == 0 else "appended"
        rows.append((label, f"{src['name']} ({src['tokens']:,} tokens), sha256 {src['sha256']}"))
    ratio = f", {h['kv_bytes'] / full:.1%} of the full cache's {full:,}" if full else ""
    rows.append(("kv bytes", f"{h['kv_bytes']:,}{ratio}"))
    rows.append(("tensor bytes", f"{tensor_bytes:,} (with the logits decoding starts from)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("bytes per layer")
    for i, (layer, b) in enumerate(zip(h["layers"], per_layer, strict=True)):
        size = layer.get("length", layer.get("seen"))
        what = "entries" if "length" in layer else "tokens seen"
        print(f"  {i:>3}  {layer['kind']:<8} {b:>14,}  ({size} {what})")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."
