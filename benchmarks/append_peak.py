"""How much a cache of growing layers holds above its own size while it grows: appending a
prefill chunk (``torch.cat`` into a new tensor when there is no room), reserving room for
decoding, and rolling an answer back (``compact``).  Linux only (peak RSS via VmHWM, reset
through ``/proc/self/clear_refs`` before each phase).

Each layer's old tensors are freed as soon as its new ones are assigned (and kvcli's mmap
threshold hands them back to the system), so a phase should peak at the cache plus about
one layer's tensors, not at two caches.  This measures it on synthetic tensors of a model's
cache shape, without the model:

    python benchmarks/append_peak.py                       # SmolLM2's shape, 7,168 + 512 tokens
    python benchmarks/append_peak.py --layers 30 --kv-heads 3 --head-dim 64 --tokens 16384

Prints one JSON line per phase: the cache's bytes after it, the RSS before and after, the
peak during it, how far that peak exceeds the larger of before and after, and one layer's
bytes.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json

import torch
from memory_phases import reset_peak, status_bytes  # this folder is on sys.path

from kvcli.cache.layers import Clock, GrowingLayer
from kvcli.engine.memory import tune_allocator

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=7168, help="entries before the appended chunk")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--decode", type=int, default=33, help="room reserved for decoding")
    args = ap.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    clock = Clock()
    layers = [GrowingLayer(clock, i) for i in range(args.layers)]
    shape = (1, args.kv_heads)

    def forward(n: int) -> None:
        start = layers[0].length
        clock.positions = torch.arange(start, start + n)
        k, v = torch.randn(*shape, n, args.head_dim), torch.randn(*shape, n, args.head_dim)
        for layer in layers:
            layer.update(k, v)

    forward(args.tokens)
    phases = {
        "append a chunk": lambda: forward(args.chunk),
        "reserve for decoding": lambda: [layer.reserve(args.decode) for layer in layers],
        "roll back (compact)": lambda: [layer.rollback({"length": args.tokens}) for layer in layers],
    }
    for name, run in phases.items():
        before = status_bytes("VmRSS")
        reset_peak()
        run()
        peak, after = status_bytes("VmHWM"), status_bytes("VmRSS")
        kv = sum(layer.nbytes() for layer in layers)
        row = {
            "phase": name,
            "kv_mib": round(kv / MIB, 1),
            "rss_before_mib": round(before / MIB, 1),
            "peak_mib": round(peak / MIB, 1),
            "rss_after_mib": round(after / MIB, 1),
            "peak_above_larger_mib": round((peak - max(before, after)) / MIB, 1),
            "one_layer_mib": round(kv / args.layers / MIB, 1),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
