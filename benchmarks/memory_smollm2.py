"""Does a smaller KV cache show in the process's peak memory?  Full cache vs snapkv and
kvmerger at budgets 0.5 and 0.35 on SmolLM2 (every layer's cache grows with the document),
each run in its own process, with kvcli's allocator setting (``kvcli.engine.memory``) and
with glibc's default malloc (``KVCLI_MMAP_THRESHOLD=0``), interleaved in one run.

    python benchmarks/memory_smollm2.py                       # ~6K tokens, 10 child processes
    python benchmarks/memory_smollm2.py --tokens 8192 --allocators tuned --methods snapkv

Each row is one ``kvcli profile`` measurement (``run_profile``, isolated): a fresh process
loads the model, prefills the same generated document, decodes 32 tokens.  ``peak RSS`` is
the child's VmHWM over prefill + decode (weights included); ``KV`` the cache tensors' bytes
after prefill.  The target (issue 15): the peak drops by at least 60% of the KV bytes a
method saves against the full cache of the same allocator setting.

Writes results/memory_smollm2.json and .md (the table and the exact command).  A benchmark,
not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from kvcli import api
from kvcli.engine.memory import ENV
from kvcli.profile.profile import ProfileSpec, default_document, run_profile

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def measure(doc: str, args: argparse.Namespace, method: str, budget: str, allocator: str) -> dict:
    saved = os.environ.get(ENV)
    if allocator == "default":
        os.environ[ENV] = "0"
    else:
        os.environ.pop(ENV, None)
    try:
        spec = ProfileSpec(
            document=doc, methods=[method], budget=budget, chunk_size=args.chunk_size, model=args.model,
            decode_tokens=args.decode_tokens, calibrate=False,
        )
        res = run_profile(spec, isolate=True)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    row = res.rows[0].as_dict() if res.rows else {"status": "missing"}
    row.update(allocator=allocator, method=method, budget=budget)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = ["| allocator | method | budget | KV MiB | KV saved MiB | peak RSS MiB | peak saved MiB | saved peak / saved KV "
             "| prefill tok/s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['allocator']} | {r['method']} | {r['budget']} | {r.get('status')}: {r.get('error')} "
                         "| | | | | |")
            continue
        full = next((f for f in rows if f["allocator"] == r["allocator"] and f["method"] == "full"
                     and f.get("status") == "ok"), None)
        kv_saved = (full["kv_bytes"] - r["kv_bytes"]) / MIB if full else float("nan")
        peak_saved = (full["peak_rss_bytes"] - r["peak_rss_bytes"]) / MIB if full else float("nan")
        share = f"{peak_saved / kv_saved:.2f}" if kv_saved > 0 else "-"
        lines.append(f"| {r['allocator']} | {r['method']} | {r['budget']} | {r['kv_bytes'] / MIB:.1f} | "
                     f"{kv_saved:.1f} | {r['peak_rss_bytes'] / MIB:,.0f} | {peak_saved:.0f} | {share} | "
                     f"{r['prefill_tokens_per_second']:.0f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--methods", default="snapkv,kvmerger")
    ap.add_argument("--budgets", default="0.5,0.35")
    ap.add_argument("--allocators", default="tuned,default", help="tuned (kvcli's setting) and/or default (glibc)")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    lm = api.load_model(args.model, quiet=True)
    doc = default_document(lm.tokenizer, args.tokens)
    del lm
    allocators = [a for a in args.allocators.split(",") if a]
    runs = [("full", "1.0")] + [(m, b) for b in args.budgets.split(",") for m in args.methods.split(",") if m]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for method, budget in runs:
        for allocator in allocators:  # interleaved: the machine's load drifts alike for both
            r = measure(doc, args, method, budget, allocator)
            rows.append(r)
            print(f"[{time.perf_counter() - t0:6.0f}s] {allocator} {method}@{budget}: "
                  + (f"kv {r['kv_bytes'] / MIB:.1f} MiB, peak {r['peak_rss_bytes'] / MIB:.0f} MiB, "
                     f"{r['prefill_tokens_per_second']:.0f} tok/s" if r.get("status") == "ok" else str(r)),
                  file=sys.stderr, flush=True)
    rows.sort(key=lambda r: allocators.index(r["allocator"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/memory_smollm2.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    tokens = next((r["tokens"] for r in rows if r.get("status") == "ok"), args.tokens)
    lines = [f"Command: `{command.strip()}` ({platform.machine()}, model {args.model}, {tokens} tokens, "
             f"chunk {args.chunk_size}, {args.decode_tokens} decoded tokens, {time.strftime('%Y-%m-%d')})", ""]
    lines += table(rows)
    (out / "memory_smollm2.md").write_text("\n".join(lines) + "\n")
    (out / "memory_smollm2.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
