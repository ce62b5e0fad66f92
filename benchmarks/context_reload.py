"""Time to first token from a saved context (``.kvc``) against prefilling the document again.

On one model (the embedded Gemma 3 270M by default; ``--model smollm2``), one process, the
model loaded once: a generated ~8K-token document (the eval suite's prose filler) is
prefilled with snapkv at budget 0.5 (scoring ``auto``, i.e. reconstruction), a question is
asked for one token (time to first token, TTFT, = prefill + question + first token), the
context is saved; then it is loaded back (``api.load_context``; the model fingerprint is
computed again, as a new process would) and asked the same question (TTFT = load + question
+ first token), three times.  It also checks that a 16-token greedy answer is the same
before and after, and reports the file size against ``kv_bytes``.

    python benchmarks/context_reload.py                    # embedded model, 8192 tokens
    python benchmarks/context_reload.py --model smollm2    # 7,900 tokens (8,192 positions, 256 kept for the answer)

Writes results/context_reload-<model>.json and .md.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvcli import api
from kvcli.core import defaults
from kvcli.engine.models import fingerprint as fp
from kvcli.eval.fillers import filler_sentences

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the main point of the document?"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def document(tokenizer, n: int, seed: int = 0) -> str:
    """Generated prose of about ``n`` tokens (the eval suite's filler: real-looking text)."""
    stream = filler_sentences("prose", random.Random(seed))
    parts: list[str] = []
    count = 0
    while count < n:
        sentence = next(stream)
        parts.append(sentence)
        count += len(tokenizer.encode(" " + sentence, add_special_tokens=False))
    return " ".join(parts)


def ttft(ctx: api.Context) -> float:
    t0 = time.perf_counter()
    ctx.ask(QUESTION, max_new_tokens=1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()

    log(f"loading {args.model}")
    lm = api.load_model(args.model, quiet=True)
    room = lm.max_positions - defaults.QUESTION_RESERVE - 36 if lm.max_positions else args.tokens
    text = document(lm.tokenizer, min(args.tokens, room))

    log("prefill")
    t0 = time.perf_counter()
    ctx = api.prefill(lm, text, method=args.method, budget=args.budget)
    prefill_s = time.perf_counter() - t0
    first_s = ttft(ctx)
    answer = ctx.ask(QUESTION, max_new_tokens=16).tokens
    report = ctx.report()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.kvc"
        t0 = time.perf_counter()
        saved = ctx.save(path)
        save_s = time.perf_counter() - t0
        del ctx
        loads, load_only = [], []
        same = True
        for i in range(args.loads):
            fp._known.clear()  # a new process computes the fingerprint again
            log(f"load {i + 1}/{args.loads}")
            t0 = time.perf_counter()
            again = api.load_context(lm, path)
            load_only.append(time.perf_counter() - t0)
            loads.append(load_only[-1] + ttft(again))
            same = same and again.ask(QUESTION, max_new_tokens=16).tokens == answer
            del again

    load_ttft = statistics.median(loads)
    prefill_ttft = prefill_s + first_s
    row = {
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "context_tokens": report.context_tokens,
        "method": report.method,
        "budget": report.budget,
        "scoring": report.scoring,
        "prefill_seconds": prefill_s,
        "ttft_prefill_seconds": prefill_ttft,
        "save_seconds": save_s,
        "load_seconds": statistics.median(load_only),
        "ttft_load_seconds": load_ttft,
        "ttft_load_all": loads,
        "speedup": prefill_ttft / load_ttft,
        "file_bytes": saved.file_bytes,
        "kv_bytes": report.kv_bytes,
        "kv_bytes_full": report.kv_bytes_full,
        "file_over_kv": saved.file_bytes / report.kv_bytes,
        "same_answer": same,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": "python benchmarks/" + Path(__file__).name + " " + shlex.join(sys.argv[1:]),
    }
    lines = [
        f"| {lm.name}, {report.context_tokens:,} tokens, {report.method} at {report.budget} ({report.scoring}) | |",
        "|---|---:|",
        f"| time to first token, prefill again | {prefill_ttft:.2f} s |",
        f"| time to first token, load .kvc (median of {args.loads}) | {load_ttft:.3f} s |",
        f"| speed-up | {row['speedup']:.0f}x |",
        f"| of which load_context | {row['load_seconds']:.3f} s |",
        f"| save | {save_s:.3f} s |",
        f"| file size | {saved.file_bytes:,} B |",
        f"| kv_bytes (full cache: {report.kv_bytes_full:,} B) | {report.kv_bytes:,} B |",
        f"| file / kv_bytes | {row['file_over_kv']:.3f} |",
        f"| same 16-token greedy answer | {'yes' if same else 'NO'} |",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = args.model.replace("/", "_")
    (out / f"context_reload-{slug}.json").write_text(json.dumps(row, indent=2) + "\n")
    (out / f"context_reload-{slug}.md").write_text(f"`{row['command']}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
