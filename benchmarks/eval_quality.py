"""Quality table for the README: every method at budgets 0.5 and 0.35 against the full cache,
on the synthetic long-context tasks, with the embedded model (Gemma 3 270M base).

    python benchmarks/eval_quality.py                      # ~1 hour on a 2-core CPU
    python benchmarks/eval_quality.py --lengths 4096,8192  # fewer samples, same time
    python benchmarks/eval_quality.py --lengths 1024 --samples 1 --methods full,streaming  # smoke run

Writes results/eval_quality.csv (one row per task and run), .json (config, summary, rows)
and .md (the table, with the exact command).  A benchmark, not a test: nothing is asserted.

Samples: by default as many per (kind, length) as fit in ``--hours`` (1), estimated from
the measured CPU speeds in DESIGN.md (about 600 tokens/s chunked prefill, 16 tokens/s
decoding); every (task, method, budget) needs one prefill, the full cache one per task.
niah_single depths are spread evenly over the samples.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

from kvcli import api
from kvcli.cli.eval import parse_kinds, parse_lengths
from kvcli.cli.options import parse_list
from kvcli.core import defaults
from kvcli.eval import runner
from kvcli.eval.report import markdown_table, write_plots, write_results
from kvcli.eval.tasks import KINDS
from kvcli.methods import method_names

PREFILL_TOK_S = 600.0
DECODE_TOK_S = 16.0
DECODE_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 45, "niah_multiquery": 45,
                 "vt": 35, "fwe": 20}  # generated + teacher-forced answer tokens, roughly
ROOT = Path(__file__).resolve().parents[1]


def estimate_seconds(kinds, lengths, samples: int, runs: int) -> float:
    """Seconds for ``samples`` tasks per (kind, length), each prefilled ``runs`` times."""
    per_sample = sum(n / PREFILL_TOK_S + 2 * DECODE_TOKENS.get(k, 30) / DECODE_TOK_S for k in kinds for n in lengths)
    return per_sample * samples * runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma-separated, or 'all' (default; the full cache always runs)")
    ap.add_argument("--budgets", default="0.5,0.35")
    ap.add_argument("--lengths", default="4096", help="comma-separated token counts, e.g. 4096,8192")
    ap.add_argument("--tasks", default="all", help=f"comma-separated kinds ({', '.join(KINDS)}) or all")
    ap.add_argument("--samples", type=int, default=None, help="tasks per (kind, length); default: what fits in --hours")
    ap.add_argument("--hours", type=float, default=1.0, help="time the default sample count aims at (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-size", type=int, default=defaults.CHUNK_SIZE)
    ap.add_argument("--scoring", default="auto", help="comma-separated scorings, each its own run (auto = recon here)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--out", default=str(ROOT / "results"))
    ap.add_argument("--plot", default=None, help="also write plots into this directory")
    args = ap.parse_args(argv)

    methods = method_names() if args.methods == "all" else parse_list(args.methods, "--methods")
    methods, budgets, _ = runner.validate_methods(methods, parse_list(args.budgets, "--budgets"))
    kinds = parse_kinds(args.tasks)
    lengths = parse_lengths(args.lengths)
    runs = 1 + sum(1 if m == "pod" else len(budgets) for m in methods)  # plain pod: one run
    samples = args.samples
    if samples is None:
        samples = max(1, math.floor(args.hours * 3600 / estimate_seconds(kinds, lengths, 1, runs)))
    depths = [round((i + 0.5) / samples, 3) for i in range(samples)] if samples > 1 else [0.5]
    est = estimate_seconds(kinds, lengths, samples, runs)
    print(f"{len(kinds) * len(lengths) * samples} tasks x {runs} runs (full + {len(methods)} methods x "
          f"{len(budgets)} budgets) = {len(kinds) * len(lengths) * samples * runs} prefills; "
          f"estimated {est / 60:.0f} min", file=sys.stderr, flush=True)

    lm = api.load_model(args.model, quiet=True)
    items = runner.synthetic_items(lm.tokenizer, kinds, lengths, samples, args.seed, depths)
    t0 = time.perf_counter()

    def on_step(done: int, total: int, label: str) -> None:
        el = time.perf_counter() - t0
        eta = f", eta {el / done * (total - done) / 60:.0f} min" if done else ""
        print(f"[{done}/{total}] {el / 60:.1f} min{eta}  {label}", file=sys.stderr, flush=True)

    settings = runner.EvalSettings(methods=methods, budgets=budgets, chunk_size=args.chunk_size,
                                   scorings=parse_list(args.scoring, "--scoring"))
    result = runner.run_eval(lm, items, settings, on_step=on_step,
                             config={"kinds": kinds, "lengths": lengths, "samples": samples, "seed": args.seed,
                                     "depths": depths})
    seconds = time.perf_counter() - t0
    command = "python benchmarks/eval_quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    result.config.update(seconds=round(seconds, 1), estimated_seconds=round(est, 1), command=command.strip())
    paths = write_results(result, args.out, stem="eval_quality", command=command.strip())
    if args.plot:
        write_plots(result.rows, args.plot)
    print(markdown_table(result.rows))
    print(f"{seconds / 60:.1f} min (estimated {est / 60:.0f}); wrote {', '.join(str(p) for p in paths.values())}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
