"""What reconstruction scoring costs at prefill, against window scoring (issue 16's target:
recon at most 2.3x window's prefill time).

One document of prose per length, prefilled with one scored method at one budget under
``--scoring window`` and ``--scoring recon``, in interleaved rounds (the order rotates each
round) so a slow phase of a shared machine hits both sides of a ratio alike; each ratio is
recon / window *of the same round*, and the table gives the median over rounds.  The recon
prefill is split into the chunks' own forwards, the reconstruction passes (forward plus
statistics) and, inside them, the statistics (``ReconStats``, timed by wrapping it here:
with the default local pass, the scored layers' attention and statistics, which come from
one softmax), so what to cut next is measured, not guessed.

    python benchmarks/recon_cost.py                                  # SmolLM2 and Gemma, 2K and 4K, 3 rounds
    python benchmarks/recon_cost.py --models smollm2 --lengths 2048 --rounds 2   # ~3 min, 2-core CPU
    python benchmarks/recon_cost.py --whole-cache-pass       # also KVzip's whole-cache pass, for comparison

Writes results/recon_cost.json and .md.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from kvcli.api import prefilling
from kvcli.attention import stats as stats_module
from prefill_speed import document_ids, log  # the same generated document (this folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SCORINGS = ("window", "recon")
WHOLE = "recon-cache"  # reconstruction with KVzip's whole-cache pass (Scoring.local_pass=False)


class StatsClock:
    """Wraps ``ReconStats.__call__`` and ``ReconStats.attend`` to add up the time spent in
    reconstruction statistics: the statistics alone for a pass over the whole cache, the
    scored layers' local attention with its statistics (one softmax) for a local pass."""

    def __init__(self) -> None:
        self.seconds = 0.0
        for name in ("__call__", "attend"):
            setattr(stats_module.ReconStats, name, self._timed(getattr(stats_module.ReconStats, name)))

    def _timed(self, orig):
        clock = self

        def timed(collector, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(collector, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - t0

        return timed


@contextlib.contextmanager
def whole_cache_pass(on: bool):
    """Reconstruction passes that attend over the whole cache (KVzip's) while ``on``."""
    orig = prefilling.make_scoring
    if on:
        prefilling.make_scoring = lambda *a, **k: dataclasses.replace(orig(*a, **k), local_pass=False)
    try:
        yield
    finally:
        prefilling.make_scoring = orig


def run_once(lm, ids, method: str, budget: str, variant: str, clock: StatsClock) -> dict:
    gc.collect()
    clock.seconds = 0.0
    t0 = time.perf_counter()
    with whole_cache_pass(variant == WHOLE):
        scoring = "recon" if variant == WHOLE else variant
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
    ap.add_argument("--whole-cache-pass", action="store_true",
                    help="also time reconstruction with KVzip's whole-cache pass (the default pass is local)")
    args = ap.parse_args(argv)
    variants = SCORINGS + ((WHOLE,) if args.whole_cache_pass else ())
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
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            for r in range(args.rounds):
                order = variants if r % 2 == 0 else variants[::-1]
                for v in order:
                    runs[v].append(run_once(lm, ids, args.method, args.budget, v, clock))
                    log(f"{model} {n} round {r + 1} {v}: {runs[v][-1]['seconds']:.1f} s")
            for v in variants[1:]:
                rec = runs[v]
                ratios = [rc["seconds"] / w["seconds"] for rc, w in zip(rec, runs["window"], strict=True)]
                rows.append({
                    "model": model, "tokens": n, "method": args.method, "budget": args.budget,
                    "pass": "whole cache" if v == WHOLE else "local",
                    "window_s": med([x["seconds"] for x in runs["window"]]),
                    "recon_s": med([x["seconds"] for x in rec]),
                    "ratio": med(ratios), "ratios": ratios,
                    "recon_passes_s": med([x["scoring_seconds"] for x in rec]),
                    "recon_stats_s": med([x["stats_seconds"] for x in rec]),
                    "recon_compress_s": med([x["compress_seconds"] for x in rec]),
                    "window_compress_s": med([x["compress_seconds"] for x in runs["window"]]),
                    "runs": {"window": runs["window"], v: rec},
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
             "| model | tokens | method @ budget | recon pass | window s | recon s | recon / window (per round) "
             "| recon passes s | of which statistics (local: with attention) s | compress s (window / recon) |",
             "|---|---:|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        per = ", ".join(f"{x:.2f}" for x in r["ratios"])
        lines.append(f"| {r['model']} | {r['tokens']} | {r['method']} @ {r['budget']} | {r['pass']} "
                     f"| {r['window_s']:.1f} "
                     f"| {r['recon_s']:.1f} | **{r['ratio']:.2f}x** ({per}) | {r['recon_passes_s']:.1f} "
                     f"| {r['recon_stats_s']:.1f} | {r['window_compress_s']:.2f} / {r['recon_compress_s']:.2f} |")
    (out / "recon_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
