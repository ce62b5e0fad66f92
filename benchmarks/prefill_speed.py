"""Prefill and decode speed on the embedded model (Gemma 3 270M, float32) on this CPU.

Compares kvcli's chunked prefill (``api.prefill``, method ``full``, chunk sizes 256, 512,
1024, 2048) with one plain forward over the same tokens (``model(input_ids,
logits_to_keep=1)`` on the same weights loaded with transformers' ``sdpa`` attention), at
4K and 16K tokens; and greedy decoding speed (64 tokens via ``Context.generate_ids``) after
the 512-chunk prefill.

    python benchmarks/prefill_speed.py            # 4K (2 rounds) and 16K (1 round): ~12 min, 2-core CPU
    python benchmarks/prefill_speed.py --quick    # 4K only, 1 round: ~2 min

Runs are interleaved: each round runs every variant once, in a rotated order, and each
chunked speed is divided by the one-shot speed *of the same round*, so slow phases on a
shared machine hit both sides of a ratio alike.  The table reports medians over rounds
(min-max in brackets).  Lengths above 8K get ``--long-rounds`` (default 1) rounds: the
16K one-shot forward alone took ~4.5 min here (sdpa computes every layer, sliding-window
ones included, over all 16K positions through a mask), so a second round would not fit in 15 min.  Writes results/prefill_speed.json and .md.  A benchmark, not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from kvcli import api
from kvcli.api import Sampler
from kvcli.eval.fillers import filler_sentences
from kvcli.engine.models import embedded_model_dir

ROOT = Path(__file__).resolve().parents[1]
ONE_SHOT = "one-shot sdpa"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def document_ids(tokenizer, n: int, seed: int = 0) -> torch.Tensor:
    """``[1, n]`` ids: BOS + generated prose (real text, so the run looks like a real document)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    stream = filler_sentences("prose", random.Random(seed))
    while len(ids) < n:
        text = " ".join(next(stream) for _ in range(50))
        ids += tokenizer.encode(" " + text, add_special_tokens=False)
    return torch.tensor([ids[:n]], dtype=torch.long)


def time_chunked(lm, ids: torch.Tensor, chunk: int) -> tuple[float, api.Context]:
    t0 = time.perf_counter()
    ctx = api.prefill(lm, ids, method="full", budget=1.0, chunk_size=chunk, raw=True)
    return time.perf_counter() - t0, ctx


@torch.inference_mode()
def time_one_shot(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    out = model(input_ids=ids, logits_to_keep=1, use_cache=False)
    _ = out.logits[0, -1].sum().item()
    return time.perf_counter() - t0


def time_decode(ctx: api.Context, tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = ctx.generate_ids(None, tokens, Sampler())
    return time.perf_counter() - t0, len(out)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict, digits: int = 0) -> str:
    if len(s["runs"]) == 1:
        return f"{s['median']:,.{digits}f}"
    return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4K tokens only, 1 round (a check, ~2 min)")
    ap.add_argument("--lengths", default=None, help="comma-separated token counts (default 4096,16384)")
    ap.add_argument("--chunks", default="256,512,1024,2048", help="chunk sizes for kvcli's prefill")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds up to 8K tokens (default 2; --quick: 1)")
    ap.add_argument("--long-rounds", type=int, default=1, help="interleaved rounds above 8K tokens (default 1)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    lengths = [int(x) for x in (args.lengths or ("4096" if args.quick else "4096,16384")).split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    rounds = args.rounds or (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    lm = api.load_model("embedded", device="cpu", dtype="float32", quiet=True)
    ref = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir(quiet=True)), dtype=torch.float32,
                                               attn_implementation="sdpa").eval()
    log(f"models loaded; torch threads {torch.get_num_threads()}, load average {load0[0]:.1f}")

    # warm-up (allocator, kernels) on a short input, both paths
    warm = document_ids(lm.tokenizer, 512, seed=1)
    time_chunked(lm, warm, 256)
    time_one_shot(ref, warm)

    variants = [ONE_SHOT] + [f"chunk {c}" for c in chunks]
    seconds: dict[int, dict[str, list[float]]] = {n: {v: [] for v in variants} for n in lengths}
    ratios: dict[int, dict[str, list[float]]] = {n: {v: [] for v in variants[1:]} for n in lengths}
    decode: dict[int, list[float]] = {n: [] for n in lengths}
    decoded: dict[int, list[int]] = {n: [] for n in lengths}

    rounds_for = {n: rounds if n <= 8192 else args.long_rounds for n in lengths}
    for r in range(max(rounds_for.values())):
        for n in lengths:
            if r >= rounds_for[n]:
                continue
            ids = document_ids(lm.tokenizer, n)
            k = (r + lengths.index(n)) % len(variants)
            order = variants[k:] + variants[:k]  # rotate so no variant always runs first
            this_round: dict[str, float] = {}
            for v in order:
                gc.collect()
                if v == ONE_SHOT:
                    secs = time_one_shot(ref, ids)
                else:
                    chunk = int(v.split()[1])
                    secs, ctx = time_chunked(lm, ids, chunk)
                    if chunk == 512:  # decode speed from the default prefill's context
                        dsecs, dn = time_decode(ctx, args.decode_tokens)
                        decode[n].append(dn / dsecs if dsecs > 0 else 0.0)
                        decoded[n].append(dn)
                    del ctx
                this_round[v] = secs
                seconds[n][v].append(secs)
                log(f"round {r + 1}/{rounds_for[n]}  {n:>6} tokens  {v:<14} {n / secs:8.0f} tok/s  ({secs:.1f} s)")
            for v in variants[1:]:
                ratios[n][v].append(this_round[ONE_SHOT] / this_round[v])  # = chunked tok/s / one-shot tok/s

    load1 = os.getloadavg()
    total = time.perf_counter() - t_start
    rows = []
    for n in lengths:
        for v in variants:
            rows.append({
                "tokens": n, "variant": v,
                "tokens_per_second": summary([n / s for s in seconds[n][v]]),
                "seconds": summary(seconds[n][v]),
                "ratio_vs_one_shot": summary(ratios[n][v]) if v != ONE_SHOT else None,
            })
    decode_rows = [{"context_tokens": n, "tokens_per_second": summary(decode[n]), "tokens_decoded": decoded[n]}
                   for n in lengths]

    command = " ".join(["python benchmarks/prefill_speed.py", shlex.join(argv if argv is not None else sys.argv[1:])]).strip()
    meta = {
        "command": command, "model": lm.name, "dtype": "float32", "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average_start": load0, "load_average_end": load1, "rounds": rounds_for,
        "chunks": chunks, "lengths": lengths, "decode_tokens": args.decode_tokens, "total_seconds": total,
    }

    head = "| tokens | prefill | tok/s | x one-shot (same round) |\n|---:|---|---:|---:|\n"
    table = head + "".join(
        f"| {r['tokens']} | {r['variant']} | {fmt(r['tokens_per_second'])} | "
        f"{'1' if r['ratio_vs_one_shot'] is None else fmt(r['ratio_vs_one_shot'], 2)} |\n" for r in rows)
    dtable = "| context tokens | decode tok/s (greedy) | tokens decoded |\n|---:|---:|---:|\n" + "".join(
        f"| {d['context_tokens']} | {fmt(d['tokens_per_second'], 1)} | {', '.join(map(str, d['tokens_decoded']))} |\n"
        for d in decode_rows)
    note = (f"{lm.name}, float32, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), "
            f"interleaved rounds per length {rounds_for}; medians [min-max]; load average {load0[0]:.1f} at start, "
            f"{load1[0]:.1f} at end (others' work on a shared machine slows every variant); {total:.0f} s in all.")
    md = (f"# Prefill and decode speed\n\n`{command}`\n\n{note}\n\n"
          f"kvcli chunked prefill (`api.prefill`, method full) vs one forward with sdpa "
          f"(`model(input_ids, logits_to_keep=1)`):\n\n{table}\n"
          f"Decoding after the 512-chunk prefill (`Context.generate_ids`, {args.decode_tokens} tokens asked; "
          f"EOS ends it early):\n\n{dtable}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill_speed.json").write_text(json.dumps({"meta": meta, "prefill": rows, "decode": decode_rows},
                                                       indent=2) + "\n", encoding="utf-8")
    (out / "prefill_speed.md").write_text(md, encoding="utf-8")
    print(md)
    log(f"wrote {out / 'prefill_speed.json'} and {out / 'prefill_speed.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
