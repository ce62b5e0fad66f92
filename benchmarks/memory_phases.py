"""Where a prefill's peak memory is reached: the chunk forwards, the scoring passes, or the
compression.  Linux only (it resets the process's high-water mark, VmHWM, through
``/proc/self/clear_refs`` before each phase and reads it after).

    python benchmarks/memory_phases.py --method snapkv --budget 0.5:heads
    python benchmarks/memory_phases.py --model smollm2 --tokens 7936 --method kvmerger --budget 0.35 --stored-pass

One prefill of kvcli profile's generated document, in this process.  Prints one JSON line:
the peak RSS of each phase (MiB, weights included), the KV bytes after prefill, the RSS
after.  ``--stored-pass``: the reconstruction pass stores its entries and is rolled back
(``Scoring.detached_pass=False``), to compare.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import kvcli.api.prefilling as prefilling
from kvcli import api
from kvcli.engine.engine import Engine
from kvcli.methods.base import Method
from kvcli.profile.profile import default_document

MIB = 2**20


def status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def watch(peaks: dict[str, int]) -> None:
    """Wrap the engine's phases so each records the peak RSS it reached."""

    def timed(phase: str, fn, pick=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            reset_peak()
            out = fn(*args, **kwargs)
            if pick(*args, **kwargs):
                peaks[phase] = max(peaks[phase], status_bytes("VmHWM"))
            return out

        return wrapped

    def is_chunk(self, ids, collector=None) -> bool:  # a scoring pass runs through observe
        return collector is None or type(collector).__name__ == "WindowStats"

    Engine.forward = timed("forward", Engine.forward, is_chunk)
    Engine.observe = timed("scoring", Engine.observe)
    Method.compress = timed("compress", Method.compress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=7936)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--stored-pass", action="store_true", help="store the reconstruction pass and roll it back")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = api.load_model(args.model, quiet=True)
    doc = default_document(lm.tokenizer, args.tokens)
    if args.stored_pass:
        make = prefilling.make_scoring
        prefilling.make_scoring = lambda *a, **k: dataclasses.replace(make(*a, **k), detached_pass=False)
    peaks = {"forward": 0, "scoring": 0, "compress": 0}
    watch(peaks)
    t0 = time.perf_counter()
    ctx = api.prefill(lm, doc, method=args.method, budget=args.budget, chunk_size=args.chunk_size, truncate=True)
    row = {
        "model": args.model,
        "method": args.method,
        "budget": args.budget,
        "pass": "stored" if args.stored_pass else "detached",
        "tokens": ctx.context_tokens,
        "kv_mib": round(ctx.engine.cache.nbytes() / MIB, 1),
        "peak_mib": {k: round(v / MIB) for k, v in peaks.items()},
        "rss_after_mib": round(status_bytes("VmRSS") / MIB),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
