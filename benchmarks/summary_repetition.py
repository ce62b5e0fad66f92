"""Summaries from a small base model: repetition penalty and n-gram blocking, measured.

    python benchmarks/summary_repetition.py                       # the grid; measured: docs/measurements.md
    python benchmarks/summary_repetition.py --penalties 1.0,1.2 --ngrams 0,3 --needles 0   # quicker

For every (repetition penalty, no-repeat n-gram) pair of the grid, on each document (the
example lighthouse report and two generated ones, prefilled once each with the full cache):
one greedy summary exactly as ``kvcli summarize`` writes it (same template, stop strings and
200-token cap), and

* ``tokens``, ``capped`` (the 200-token cap cut it off), ``rep4`` (share of the summary's
  token 4-grams that already occurred in it: 0 = no repetition);
* ``loglik``: the mean log-likelihood per token of the summary under the model with no
  guards (the eval's likelihood measure applied to the summary; guards that force
  unlikely tokens lower it);
* ``facts`` (lighthouse report only): how many of ten key facts of the report it mentions.

Then the same guards on ``ask``, as the eval scores it (``--needles`` niah_single tasks at
``--needle-length`` tokens, the eval's questions, answer budgets and scoring): the eval's
answer likelihood is teacher-forced and does not depend on the decoding, so the score is
what the guards can change.

Writes results/summary_repetition.json (every summary's text too) and prints the tables.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcli import api
from kvcli.core import defaults
from kvcli.eval.runner import max_new_tokens_for, synthetic_items
from kvcli.eval.scoring import score_answers
from kvcli.eval.tasks import generate_task

ROOT = Path(__file__).resolve().parents[1]
LIGHTHOUSE = ROOT / "examples" / "lighthouse_report.md"
# Ten things a summary of the lighthouse report could say (regular expressions, any match counts).
FACTS = {
    "Tessaly Rock": r"tessaly",
    "built 1847": r"1847",
    "LED conversion": r"(?-i:\bLED\b)|light-emitting|diode",
    "storm": r"storm",
    "Kittiwake": r"kittiwake",
    "finances": r"2\.4 million|income|expenditure|surplus",
    "solar plans": r"solar",
    "retirements": r"retire",
    "rescue": r"northern star|foyle|lifeboat|rescue",
    "visitors": r"visitor",
}


@dataclass
class Recording(api.Sampler):
    """A sampler that also records the log-likelihood, under the unguarded model, of each token it picks."""

    logps: list[float] = field(default_factory=list)

    def __call__(self, logits: torch.Tensor, history=()) -> int:
        token = super().__call__(logits, history)
        self.logps.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        return token


def rep_ngrams(tokens: list[int], n: int = 4) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def facts_found(text: str) -> list[str]:
    return [name for name, rx in FACTS.items() if re.search(rx, text, flags=re.IGNORECASE)]


def documents(tokenizer, length: int) -> list[tuple[str, str]]:
    docs = [("lighthouse_report.md", api.open_document(str(LIGHTHOUSE)).text)]
    for style in ("prose", "report"):
        task = generate_task("niah_single", tokenizer, length, seed=7, depth=0.5, filler=style)
        docs.append((f"generated {style} ({length} tokens)", task.context))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--penalties", default="1.0,1.1,1.2")
    ap.add_argument("--ngrams", default="0,3,4")
    ap.add_argument(
        "--settings", default=None, help="explicit PENALTY:NGRAM pairs instead of the grid, e.g. 1.0:0,1.0:3"
    )
    ap.add_argument("--max-new-tokens", type=int, default=defaults.SUMMARY_MAX_NEW_TOKENS)
    ap.add_argument("--doc-length", type=int, default=2048, help="tokens of each generated document")
    ap.add_argument("--needles", type=int, default=5, help="niah_single tasks for the ask check (0: skip)")
    ap.add_argument("--needle-length", type=int, default=2048)
    ap.add_argument("--model", default=defaults.MODEL)
    ap.add_argument("--out", default=str(ROOT / "results" / "summary_repetition.json"))
    ap.add_argument("--resume", action="store_true", help="keep the measurements already in --out, do the rest")
    args = ap.parse_args(argv)
    if args.settings:
        grid = [(float(p), int(n)) for p, n in (pair.split(":") for pair in args.settings.split(","))]
    else:
        grid = [(float(p), int(n)) for p in args.penalties.split(",") for n in args.ngrams.split(",")]

    lm = api.load_model(args.model, quiet=True)
    t_start = time.perf_counter()
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.resume and out.exists() else {}
    summaries: list[dict] = [
        r for r in old.get("summaries", []) if (r["repetition_penalty"], r["no_repeat_ngram"]) in grid
    ]
    asks: list[dict] = [r for r in old.get("asks", []) if (r["repetition_penalty"], r["no_repeat_ngram"]) in grid]
    done = {(r["document"], r["repetition_penalty"], r["no_repeat_ngram"]) for r in summaries}
    asked = {(r["depth"], r["repetition_penalty"], r["no_repeat_ngram"]) for r in asks}
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    def save() -> None:  # after every measurement: a long run stopped early keeps what it measured
        result = {"command": command, "model": lm.name, "seconds": round(time.perf_counter() - t_start, 1)}
        out.write_text(json.dumps({**result, "summaries": summaries, "asks": asks}, indent=2) + "\n")

    for name, text in documents(lm.tokenizer, args.doc_length):
        todo = [(p, n) for p, n in grid if (name, p, n) not in done]
        if not todo:
            continue
        ctx = api.prefill(lm, text, method="full")
        for penalty, ngram in todo:
            sampler = Recording(repetition_penalty=penalty, no_repeat_ngram=ngram)
            t0 = time.perf_counter()
            ans = ctx.summarize(max_new_tokens=args.max_new_tokens, sampler=sampler)
            row = {
                "document": name,
                "context_tokens": ctx.context_tokens,
                "repetition_penalty": penalty,
                "no_repeat_ngram": ngram,
                "tokens": len(ans.tokens),
                "capped": len(ans.tokens) >= args.max_new_tokens,
                "rep4": rep_ngrams(ans.tokens),
                "loglik": sum(sampler.logps) / max(1, len(sampler.logps)),
                "facts": facts_found(ans.text) if name.startswith("lighthouse") else None,
                "seconds": time.perf_counter() - t0,
                "text": ans.text,
            }
            summaries.append(row)
            save()
            facts = "" if row["facts"] is None else f" facts {len(row['facts'])}/{len(FACTS)}"
            print(
                f"{name[:28]:28s} rp {penalty:.2f} ngram {ngram}: {row['tokens']:3d} tok"
                f"{' CAP' if row['capped'] else '    '} rep4 {row['rep4']:.2f} loglik {row['loglik']:+.2f}{facts}",
                flush=True,
            )
        del ctx

    if args.needles:
        items = synthetic_items(lm.tokenizer, ["niah_single"], [args.needle_length], args.needles, seed=0)
        for it in items:
            todo = [(p, n) for p, n in grid if (it.depth, p, n) not in asked]
            if not todo:
                continue
            ctx = api.prefill(lm, it.context, method="full")
            for penalty, ngram in todo:
                sampler = api.Sampler(repetition_penalty=penalty, no_repeat_ngram=ngram)
                limit = max_new_tokens_for(it, lm.tokenizer)
                ans = ctx.ask(it.question, max_new_tokens=limit, sampler=sampler, answer_prefix=it.answer_prefix)
                asks.append(
                    {
                        "depth": it.depth,
                        "repetition_penalty": penalty,
                        "no_repeat_ngram": ngram,
                        "answers": it.answers,
                        "prediction": ans.text,
                        "score": score_answers(it.answers, it.metric, ans.text),
                    }
                )
            save()
            del ctx

    print("\nsummaries (mean over documents; facts: lighthouse report)")
    print("| repetition penalty | no-repeat n-gram | tokens | capped | rep4 | loglik | facts | ask score |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for penalty, ngram in grid:
        rs = [r for r in summaries if (r["repetition_penalty"], r["no_repeat_ngram"]) == (penalty, ngram)]
        a = [r["score"] for r in asks if (r["repetition_penalty"], r["no_repeat_ngram"]) == (penalty, ngram)]
        lh = next((r for r in rs if r["facts"] is not None), None)
        facts = "-" if lh is None else f"{len(lh['facts'])}/{len(FACTS)}"
        score = "-" if not a else f"{100 * sum(a) / len(a):.0f}"
        print(
            f"| {penalty:.2f} | {ngram or '-'} | {sum(r['tokens'] for r in rs) / len(rs):.0f} | "
            f"{sum(r['capped'] for r in rs)}/{len(rs)} | {sum(r['rep4'] for r in rs) / len(rs):.2f} | "
            f"{sum(r['loglik'] for r in rs) / len(rs):+.2f} | "
            f"{facts} | {score} |"
        )
    save()
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
