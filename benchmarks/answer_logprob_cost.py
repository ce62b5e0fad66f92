"""What the eval's answer log-likelihood costs: one teacher-forced forward of the question
and the answer (``Context.answer_logprob`` since 2026-12-06) against the loop it replaced,
one forward per answer token (each of which appended to the whole cache).

A document of prose is prefilled once per model (full cache); then, in interleaved rounds
(the order alternates each round, so a slow phase of the shared machine hits both sides),
both ways score the same question and answer.  Reported: the median over rounds of each
round's ratio loop / one pass, and the largest difference between the two log-likelihoods.

    python benchmarks/answer_logprob_cost.py                         # SmolLM2 and Gemma, 6K tokens, 3 rounds
    python benchmarks/answer_logprob_cost.py --models smollm2 --tokens 2048 --rounds 2

A benchmark, not a test: nothing is asserted (tests/test_answer_logprob.py checks the values).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvcli import api
from prefill_speed import document_ids, log  # the same generated document (this folder is on sys.path)

QUESTION = "What is the special magic number for jolly-dragon mentioned in the provided text?"
ANSWER = "The special magic number for jolly-dragon mentioned in the provided text is 7848735."


@torch.inference_mode()
def token_by_token(ctx: api.Context) -> float:
    """The replaced loop: the question in one forward, then one forward per answer token."""
    prompt = ctx.tokenizer.encode(ctx.template.question(QUESTION), add_special_tokens=False)
    target = ctx.tokenizer.encode(" " + ANSWER, add_special_tokens=False)
    engine = ctx.engine
    mark = engine.cache.checkpoint()
    try:
        logits = engine.forward(torch.tensor([prompt]))
        total = 0.0
        for tok in target:
            total += float(torch.log_softmax(logits.float(), dim=-1)[tok])
            logits = engine.forward(torch.tensor([[tok]]))
    finally:
        engine.cache.rollback(mark)
    return total / len(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,embedded")
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for name in args.models.split(","):
        lm = api.load_model(name)
        ctx = api.prefill(lm, document_ids(lm.tokenizer, args.tokens)[0], method="full", budget=1.0, raw=True)
        ratios, diffs, times = [], [], {"loop": [], "one_pass": []}
        for r in range(args.rounds):
            ways = [("loop", lambda: token_by_token(ctx)), ("one_pass", lambda: ctx.answer_logprob(QUESTION, ANSWER))]
            got = {}
            for way, fn in ways if r % 2 == 0 else ways[::-1]:
                t0 = time.perf_counter()
                got[way] = fn()
                times[way].append(time.perf_counter() - t0)
            ratios.append(times["loop"][-1] / times["one_pass"][-1])
            diffs.append(abs(got["loop"] - got["one_pass"]))
            log(f"{name} round {r}: loop {times['loop'][-1]:.2f}s one pass {times['one_pass'][-1]:.2f}s")
        row = {
            "model": name,
            "context_tokens": ctx.context_tokens,
            "answer_tokens": len(ctx.tokenizer.encode(" " + ANSWER, add_special_tokens=False)),
            "loop_seconds_median": statistics.median(times["loop"]),
            "one_pass_seconds_median": statistics.median(times["one_pass"]),
            "ratio_median": statistics.median(ratios),
            "max_logprob_difference": max(diffs),
            "rounds": args.rounds,
        }
        print(json.dumps(row), flush=True)
        del ctx, lm


if __name__ == "__main__":
    main()
