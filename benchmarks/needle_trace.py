"""Where do a needle's tokens end up in a compressed cache?  A diagnostic, not a test.

For the eval suite's needle tasks (single needles, or with ``--task niah_multikey`` the
queried key's value), prefill with a method and print, for every growing layer, the cache
entries around the needle's value: each entry's logical position and how many tokens it
stands for (``count`` > 1 = merged), then the model's answer.

    python benchmarks/needle_trace.py --method kvmerger --budget 0.5
    python benchmarks/needle_trace.py --method kvmerger --budget 0.5 -o fallback=evict
    python benchmarks/needle_trace.py --model smollm2 --method snapkv --scoring recon --length 2048 \
        --samples 8 --depths 0.062,0.188,0.312,0.438,0.562,0.688,0.812,0.938 --only 0.562,0.688 --heads
        # the eval's tasks (same samples and depths), two of them: per KV head, the needle tokens lost

``--heads``: instead of the entries around the needle in each layer's first KV head, one
line per layer listing, for every KV head, the needle tokens (offsets in the value) it no
longer holds, and a count of the layer-heads that lost at least one of them and all of them.
"""

from __future__ import annotations

import argparse

from kvcli import api
from kvcli.eval import runner
from kvcli.cli.options import parse_options


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="kvmerger")
    ap.add_argument("--task", default="niah_single", help="niah_single or niah_multikey (the queried key's value)")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a model name (default: the embedded one)")
    ap.add_argument("--scoring", default="auto", help="window, recon, question or auto")
    ap.add_argument("--depths", default=None, help="comma-separated needle depths, cycled as kvcli eval does (default: --samples evenly)")
    ap.add_argument("--only", default=None, help="comma-separated depths: trace only these tasks")
    ap.add_argument("--heads", action="store_true", help="per KV head: the needle tokens each lost")
    ap.add_argument("-o", "--option", action="append", default=[])
    args = ap.parse_args(argv)
    lm = api.load_model(args.model, quiet=True)
    tok = lm.tokenizer
    if args.depths:
        depths = [float(d) for d in args.depths.split(",")]
    else:
        depths = [round((i + 0.5) / args.samples, 3) for i in range(args.samples)]
    items = runner.synthetic_items(tok, [args.task], [args.length], args.samples, args.seed, depths)
    if args.only:
        only = [float(d) for d in args.only.split(",")]
        items = [it for it in items if any(abs(it.depth - d) < 1e-9 for d in only)]
    for it in items:
        ids = tok.encode(it.context, add_special_tokens=False)
        value = tok.encode(" " + it.answers[0], add_special_tokens=False)
        starts = [i for i in range(len(ids) - len(value) + 1) if ids[i : i + len(value)] == value]
        ctx = api.prefill(lm, it.context, method=args.method, budget=args.budget,
                          method_options=parse_options(args.option), scoring=args.scoring)
        answer = ctx.ask(it.question, max_new_tokens=12, answer_prefix=it.answer_prefix).text
        print(f"depth {it.depth:.2f}: answer {answer!r}, expected {it.answers[0]}")
        if not starts:
            print("  (needle value not found as one token run)")
            continue
        lo = starts[0] + ctx.context_tokens - len(ids)
        hi = lo + len(value)
        print(f"  needle value at positions {lo}..{hi - 1} ({len(value)} tokens)")
        if args.heads:
            lost_any = lost_all = pairs = 0
            for layer in ctx.engine.cache.growing_layers:
                kept = layer.key_positions()[0]
                lost = [[p - lo for p in range(lo, hi) if not bool((kept[h] == p).any())] for h in range(kept.shape[0])]
                pairs += len(lost)
                lost_any += sum(bool(x) for x in lost)
                lost_all += sum(len(x) == hi - lo for x in lost)
                print(f"  layer {layer.layer_idx:2d} lost per head: {' | '.join(' '.join(map(str, x)) or '-' for x in lost)}")
            print(f"  layer-heads that lost a needle token: {lost_any} of {pairs}; all of them: {lost_all}")
            continue
        for layer in ctx.engine.cache.growing_layers:
            pos = layer.key_positions()[0, 0].tolist()
            cnt = layer.entry_counts()[0, 0].tolist()
            near = [f"{p}x{int(c)}" for p, c in zip(pos, cnt) if lo - 2 <= p < hi + 2]
            print(f"  layer {layer.layer_idx:2d}: {' '.join(near) or '(none kept)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
