"""What compression costs and saves on the embedded model: every method at budgets 0.5 and
0.35 beside the full cache, on one generated document of 16K tokens (default).

    python benchmarks/compression.py                          # ~20 min on a 2-core CPU
    python benchmarks/compression.py --tokens 4096 --budgets 0.5 --methods full,kvmerger  # smoke run

Each (method, budget) is one ``kvcli profile`` measurement (``kvcli.profile.run_profile``):
its own child process, one real prefill of the same document, then greedy decoding of a
fixed number of tokens.  Columns: ``kv_bytes / kv_bytes_full`` (all layers, counted from
the cache tensors), peak RSS of the child (weights included), prefill tokens/s, decode
tokens/s and its ratio to the full cache's in the same run, and the compression step's
share of prefill time (``compress_seconds / prefill_seconds``, measured inside the engine
around every ``method.compress`` call).  Plain ``pod`` keeps every token (its saving is
the shared distant keys), so it runs once, not once per budget.

Writes results/compression.json (every row, trace included) and results/compression.md
(the table and the exact command), plus results/compression.png (KV bytes and peak memory
against tokens, sampled during prefill, at the first budget).  A benchmark, not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

from kvcli import api
from kvcli.methods import method_names
from kvcli.profile.plot import plot_rows
from kvcli.profile.profile import ProfileRow, ProfileSpec, default_document, run_profile

ROOT = Path(__file__).resolve().parents[1]


def fmt_row(r: dict, full: dict | None) -> str:
    if r.get("status") != "ok":
        return f"| {r['method']} | {r.get('budget')} | {r.get('status')}: {r.get('error', '')} | | | | | |"
    share = r["compress_seconds"] / r["prefill_seconds"] if r.get("prefill_seconds") else float("nan")
    dec = r.get("decode_tokens_per_second") or float("nan")
    dec_ratio = dec / full["decode_tokens_per_second"] if full and full.get("decode_tokens_per_second") else float("nan")
    return (f"| {r['method']} | {r['budget']} | {r['kv_bytes'] / r['kv_bytes_full']:.3f} | "
            f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB | {r['prefill_tokens_per_second']:,.0f} | "
            f"{dec:.1f} | {dec_ratio:.2f} | {100 * share:.1f}% |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--budgets", default="0.5,0.35")
    ap.add_argument("--methods", default="all", help="comma-separated, or all (full always runs)")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    names = [m for m in method_names() if m != "full"] if args.methods == "all" else \
        [m for m in args.methods.split(",") if m and m != "full"]
    budgets = [b for b in args.budgets.split(",") if b]
    lm = api.load_model(args.model, quiet=True)
    doc = default_document(lm.tokenizer, args.tokens)
    del lm
    runs = [("full", "1.0")] + [(m, "1.0") for m in names if m == "pod"]
    runs += [(m, b) for b in budgets for m in names if m != "pod"]
    rows: list[dict] = []
    typed: list[ProfileRow] = []
    t0 = time.perf_counter()
    for method, budget in runs:
        spec = ProfileSpec(document=doc, methods=[method], budget=budget, chunk_size=args.chunk_size,
                           decode_tokens=args.decode_tokens, model=args.model)
        res = run_profile(spec, isolate=True)
        rows.extend(r.as_dict() for r in res.rows)
        typed.extend(res.rows)
        r = rows[-1] if res.rows else {"method": method, "status": "missing"}
        print(f"[{time.perf_counter() - t0:6.0f}s] {method}@{budget}: "
              + (f"kv {r['kv_bytes'] / r['kv_bytes_full']:.3f}, prefill {r['prefill_tokens_per_second']:.0f} tok/s, "
                 f"decode {r.get('decode_tokens_per_second') or 0:.1f} tok/s, compress {r['compress_seconds']:.1f}s"
                 if r.get("status") == "ok" else str(r.get("status")) + " " + str(r.get("error", ""))),
              file=sys.stderr, flush=True)
        if res.interrupted:
            break
    full = next((r for r in rows if r["method"] == "full" and r.get("status") == "ok"), None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/compression.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tokens = full["tokens"] if full else args.tokens
    lines = [f"Command: `{command.strip()}` ({platform.processor() or platform.machine()}, "
             f"{tokens} tokens, chunk {args.chunk_size}, {args.decode_tokens} decoded tokens, "
             f"{time.strftime('%Y-%m-%d')})", "",
             "| method | budget | KV bytes / full | peak RSS | prefill tok/s | decode tok/s | decode vs full | compress share of prefill |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [fmt_row(r, full) for r in rows]
    (out / "compression.md").write_text("\n".join(lines) + "\n")
    (out / "compression.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str))
    first = [r for r in typed if r.status == "ok" and (r.method in ("full", "pod") or r.budget == budgets[0])]
    try:
        plot_rows(first, str(out / "compression.png"), title=f"embedded model, {tokens} tokens, budget {budgets[0]}")
    except Exception as exc:  # the table matters more than the picture
        print(f"plot failed: {exc}", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
