"""What reconstruction scoring costs at prefill, against window scoring (issue 16's target:
recon at most 2.3x window's prefill time).

One document of prose per length, prefilled with one scored method at one budget under
``--scoring window`` and ``--scoring recon``, in interleaved rounds (the order rotates each
round) so a slow phase of a shared machine hits both sides of a ratio alike; each ratio is
recon / window *of the same round*, and the table gives the median over rounds.  The recon
prefill is split into the chunks' own forwards, the reconstruction passes (forward plus
statistics) and, inside them, the statistics alone (``ReconStats``, timed by wrapping it
here), so what to cut next is measured, not guessed.

    python benchmarks/recon_cost.py                                  # SmolLM2 and Gemma, 2K and 4K, 3 rounds
    python benchmarks/recon_cost.py --models smollm2 --lengths 2048 --rounds 2   # ~3 min, 2-core CPU

Writes results/recon_cost.json and .md.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvcli import api
from kvcli.attention import stats as stats_module
from prefill_speed import document_ids, log  # the same generated document (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SCORINGS = ("window", "recon")


class StatsClock:
    """Wraps ``ReconStats.__call__`` to add up the time spent in reconstruction statistics."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._orig = stats_module.ReconStats.__call__
        clock = self

        def timed(collector, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return clock._orig(collector, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t0

        stats_module.ReconStats.__call__ = timed  # type: ignore[method-assign]


def run_once(lm, ids, method: str, budget: str, scoring: str, clock: StatsClock) -> dict:
    gc.collect()
    clock.seconds = 0.0
    t0 = time.perf_counter()
    ctx = api.prefill(lm, ids, method=method, budget=budget, scoring=scoring, raw=True)
    wall = time.perf_counter() - t0
    st = ctx.engine.stats
    return {
        "seconds": wall,
        "scoring_seconds": st.scoring_seconds,
        "stats_seconds": clock.seconds,
        "compress_seconds": st.compress_seconds,
    }


def med(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,embedded")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    clock = StatsClock()
    load0 = os.getloadavg()
    rows = []
    for model in args.models.split(","):
        lm = api.load_model(model, device="cpu", dtype="float32", quiet=True)
        log(f"{model} loaded; torch threads {torch.get_num_threads()}")
        run_once(lm, document_ids(lm.tokenizer, 600, seed=1), args.method, args.budget, "recon", clock)  # warm-up
        for n in lengths:
            ids = document_ids(lm.tokenizer, n)
            runs: dict[str, list[dict]] = {s: [] for s in SCORINGS}
            for r in range(args.rounds):
                order = SCORINGS if r % 2 == 0 else SCORINGS[::-1]
                for s in order:
                    runs[s].append(run_once(lm, ids, args.method, args.budget, s, clock))
                    log(f"{model} {n} round {r + 1} {s}: {runs[s][-1]['seconds']:.1f} s")
            ratios = [rc["seconds"] / w["seconds"] for rc, w in zip(runs["recon"], runs["window"], strict=True)]
            rec = runs["recon"]
            rows.append({
                "model": model, "tokens": n, "method": args.method, "budget": args.budget,
                "window_s": med([x["seconds"] for x in runs["window"]]),
                "recon_s": med([x["seconds"] for x in rec]),
                "ratio": med(ratios), "ratios": ratios,
                "recon_passes_s": med([x["scoring_seconds"] for x in rec]),
                "recon_stats_s": med([x["stats_seconds"] for x in rec]),
                "recon_compress_s": med([x["compress_seconds"] for x in rec]),
                "window_compress_s": med([x["compress_seconds"] for x in runs["window"]]),
                "runs": runs,
            })
        del lm
        gc.collect()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/recon_cost.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load0[0], "rounds": args.rounds}
    (out / "recon_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"`{meta['command']}` ({meta['cpus']} CPUs, load average {load0[0]:.1f} at start; "
             f"medians of {args.rounds} interleaved rounds)", "",
             "| model | tokens | method @ budget | window s | recon s | recon / window (per round) "
             "| recon passes s | of which statistics s | compress s (window / recon) |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        per = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['model']} | {r['tokens']} | {r['method']} @ {r['budget']} | {r['window_s']:.1f} "
                     f"| {r['recon_s']:.1f} | **{r['ratio']:.2f}x** ({per}) | {r['recon_passes_s']:.1f} "
                     f"| {r['recon_stats_s']:.1f} | {r['window_compress_s']:.2f} / {r['recon_compress_s']:.2f} |")
    (out / "recon_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
