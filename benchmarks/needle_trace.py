"""Where do a needle's tokens end up in a compressed cache?  A diagnostic, not a test.

For single-needle tasks (the eval suite's generator), prefill with a method and print,
for every growing layer, the cache entries around the needle's value: each entry's
logical position and how many tokens it stands for (``count`` > 1 = merged), then the
model's answer.

    python benchmarks/needle_trace.py --method kvmerger --budget 0.5
    python benchmarks/needle_trace.py --method kvmerger --budget 0.5 -o fallback=evict
"""

from __future__ import annotations

import argparse

from kvcli import api
from kvcli.eval import runner
from kvcli.cli.options import parse_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="kvmerger")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--option", action="append", default=[])
    args = ap.parse_args(argv)
    lm = api.load_model(None, quiet=True)
    tok = lm.tokenizer
    depths = [round((i + 0.5) / args.samples, 3) for i in range(args.samples)]
    items = runner.synthetic_items(tok, ["niah_single"], [args.length], args.samples, args.seed, depths)
    for it in items:
        ids = tok.encode(it.context, add_special_tokens=False)
        value = tok.encode(" " + it.answers[0], add_special_tokens=False)
        starts = [i for i in range(len(ids) - len(value) + 1) if ids[i : i + len(value)] == value]
        ctx = api.prefill(lm, it.context, method=args.method, budget=args.budget,
                          method_options=parse_options(args.option))
        answer = ctx.ask(it.question, max_new_tokens=12, answer_prefix=it.answer_prefix).text
        print(f"depth {it.depth:.2f}: answer {answer!r}, expected {it.answers[0]}")
        if not starts:
            print("  (needle value not found as one token run)")
            continue
        lo = starts[0] + ctx.context_tokens - len(ids)
        hi = lo + len(value)
        print(f"  needle value at positions {lo}..{hi - 1} ({len(value)} tokens)")
        for layer in ctx.engine.cache.growing_layers:
            pos = layer.key_positions()[0, 0].tolist()
            cnt = layer.entry_counts()[0, 0].tolist()
            near = [f"{p}x{int(c)}" for p, c in zip(pos, cnt) if lo - 2 <= p < hi + 2]
            print(f"  layer {layer.layer_idx:2d}: {' '.join(near) or '(none kept)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
