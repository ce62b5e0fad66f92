"""Running evaluations: every item through the full cache and every method x budget.

One loaded model serves the whole run.  Items that share a context (a user's document
with several questions) are prefilled once per (method, budget); synthetic tasks each
have their own context.  The full cache is prefilled once per context, first, and is the
reference for the answer-likelihood delta of every other run on that context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcli.budget import Budget, parse_budget
from kvcli.errors import KvcliError
from kvcli.eval.scoring import load_questions, score_answers
from kvcli.eval.tasks import KINDS, Task, generate_suite
from kvcli.methods import make_method

FULL = "full"
FULL_BUDGET = parse_budget(1.0)

#: Columns of a result row, in CSV order.
COLUMNS = ("kind", "length", "depth", "sample", "method", "budget", "score", "logprob", "logprob_delta",
           "kv_ratio", "prefill_seconds", "seed", "question", "answers", "prediction")


@dataclass
class EvalItem:
    """One question about one context, with its references (a synthetic task or a user's)."""

    kind: str
    context: str
    question: str
    answers: list[str]
    metric: str  # "all" | "any" (see scoring.score_answers)
    answer_prefix: str = ""
    length: int = 0  # context tokens
    depth: float | None = None
    sample: int = 0
    seed: int | None = None

    @property
    def reference(self) -> str:
        """The answer whose likelihood is measured: all answers joined when all are wanted,
        the first one when any will do (the others are alternatives, not a list)."""
        return ", ".join(self.answers) if self.metric == "all" else self.answers[0]


@dataclass
class EvalResult:
    rows: list[dict]
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from kvcli.eval.report import summarize

        return {"config": self.config, "summary": summarize(self.rows), "rows": self.rows}


# ------------------------------------------------------------------ building items
def items_from_tasks(tasks: Sequence[Task]) -> list[EvalItem]:
    """Items from synthetic tasks; ``sample`` numbers the tasks of each (kind, length)."""
    seen: dict[tuple[str, int], int] = {}
    items = []
    for t in tasks:
        i = seen.get((t.kind, t.target_length), 0)
        seen[(t.kind, t.target_length)] = i + 1
        items.append(EvalItem(kind=t.kind, context=t.context, question=t.question, answers=list(t.answers),
                              metric=t.metric, answer_prefix=t.answer_prefix, length=t.target_length,
                              depth=t.depth, sample=i, seed=t.seed))
    return items


def synthetic_items(tokenizer, kinds: Sequence[str], lengths: Sequence[int], samples: int, seed: int,
                    depths: Sequence[float] | None = None) -> list[EvalItem]:
    kw = {"depths": tuple(depths)} if depths else {}
    return items_from_tasks(generate_suite(kinds, lengths, samples, seed, tokenizer, **kw))


def question_items(text: str, questions: list[dict] | str, tokenizer) -> list[EvalItem]:
    """Items for a user's document and question/answer pairs (a list from
    ``scoring.load_questions`` or the path of a JSONL file)."""
    if isinstance(questions, str):
        questions = load_questions(questions)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    return [EvalItem(kind="questions", context=text, question=q["question"], answers=list(q["answers"]),
                     metric=q["metric"], answer_prefix=str(q.get("answer_prefix") or ""), length=n,
                     sample=i) for i, q in enumerate(questions)]


# ------------------------------------------------------------------ options
def parse_list(value: str | Sequence[str] | None, what: str) -> list[str]:
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    out = [p.strip() for p in parts if p.strip()]
    if not out and isinstance(value, str):
        raise KvcliError(f"--{what}: empty list")
    return out


def parse_lengths(value: str | Sequence) -> list[int]:
    """``2048,4K,16k`` -> token counts (K = 1024)."""
    out = []
    for p in parse_list(value if isinstance(value, str) else [str(v) for v in value], "lengths"):
        text = p.lower()
        mult = 1024 if text.endswith("k") else 1
        try:
            n = int(text[:-1] if mult > 1 else text) * mult
        except ValueError:
            raise KvcliError(f"invalid length {p!r}: give token counts like 2048 or 4K") from None
        if n < 1:
            raise KvcliError(f"invalid length {p!r}: it must be positive")
        out.append(n)
    return out


def parse_depths(value: str | Sequence | None) -> list[float] | None:
    if value is None:
        return None
    out = []
    for p in parse_list(value if isinstance(value, str) else [str(v) for v in value], "depths"):
        try:
            d = float(p)
        except ValueError:
            raise KvcliError(f"invalid depth {p!r}: give fractions in [0, 1]") from None
        if not 0.0 <= d <= 1.0:
            raise KvcliError(f"invalid depth {p!r}: it must be in [0, 1]")
        out.append(d)
    return out


def parse_kinds(value: str | Sequence[str] | None) -> list[str]:
    kinds = parse_list(value, "tasks") if value is not None else list(KINDS)
    if value is not None and any(k == "all" for k in kinds):
        return list(KINDS)
    for k in kinds:
        if k not in KINDS:
            raise KvcliError(f"unknown task kind {k!r} (choose from {', '.join(KINDS)}, or all)")
    return list(dict.fromkeys(kinds))


def split_options(options: dict, methods: Sequence[str]) -> dict[str, dict]:
    """Method options per method.  ``method.key`` applies to that method only; a plain
    ``key`` applies to every compressing method of the run (each must accept it)."""
    per: dict[str, dict] = {m: {} for m in methods}
    for key, value in options.items():
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in per:
                raise KvcliError(f"--option {key}: method {scope!r} is not in this run ({', '.join(methods) or 'none'})")
            per[scope][name] = value
        else:
            for m in methods:
                per[m].setdefault(key, value)
    return per


def validate_methods(methods: Sequence[str], budgets: Sequence[str | float | Budget],
                     options: dict | None = None) -> tuple[list[str], list[Budget], dict[str, dict]]:
    """Check names, budgets and options before any model is loaded (one-line errors).
    ``full`` is always run (once, as the reference), so it is dropped from ``methods``."""

    methods = [m for m in dict.fromkeys(methods) if m != FULL]
    parsed = [b if isinstance(b, Budget) else parse_budget(b) for b in budgets]
    parsed = list(dict.fromkeys(parsed))
    if methods and not parsed:
        raise KvcliError("--budgets: give at least one budget")
    per = split_options(options or {}, methods)
    unscoped = any("." not in k for k in (options or {}))
    for m in methods:
        try:
            make_method(m, **per[m])
        except KvcliError as exc:
            hint = (" (give an option to one method only with --option METHOD.KEY=VALUE)"
                    if unscoped and "option" in str(exc) else "")
            raise KvcliError(f"{exc}{hint}") from None
    return methods, parsed, per


def max_new_tokens_for(item: EvalItem, tokenizer) -> int:
    """Room for the answer: 16 tokens for one short answer, more for lists."""
    need = len(tokenizer.encode(", ".join(item.answers), add_special_tokens=False))
    return int(min(256, max(16, need + 4 * len(item.answers) + 8)))


# ------------------------------------------------------------------ the run
def _groups(items: Sequence[EvalItem], query_aware: bool) -> list[list[EvalItem]]:
    """Items that can share one prefill: same context (and, query-aware, same question)."""
    groups: dict[tuple, list[EvalItem]] = {}
    for it in items:
        key = (it.context, it.question) if query_aware else (it.context,)
        groups.setdefault(key, []).append(it)
    return list(groups.values())


def run_eval(
    lm,
    items: Sequence[EvalItem],
    methods: Sequence[str] = (),
    budgets: Sequence[str | float | Budget] = (0.5,),
    chunk_size: int = 512,
    query_aware: bool = False,
    method_options: dict | None = None,
    backend: str = "sdpa",
    truncate: bool = False,
    max_new_tokens: int | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
    config: dict | None = None,
) -> EvalResult:
    """Evaluate ``items`` with the full cache and every ``method`` x ``budget``.

    Returns one row per (item, run) with the columns in ``COLUMNS``.  ``method_options``:
    see ``split_options``.  ``max_new_tokens`` overrides ``max_new_tokens_for``.  ``on_step(done, total, label)`` is called before each prefill
    (``done`` counts finished prefills) and once at the end.
    """
    from kvcli import api

    if not items:
        raise KvcliError("nothing to evaluate: no tasks or questions")
    methods, budgets, per = validate_methods(methods, budgets, method_options)
    runs: list[tuple[str, Budget]] = [(FULL, FULL_BUDGET)]
    for m in methods:  # plain PoD keeps every token: one run, whatever the budgets
        runs += [(m, FULL_BUDGET)] if not make_method(m, **per[m]).uses_budget else [(m, b) for b in budgets]
    groups = _groups(items, query_aware)
    total = len(groups) * len(runs)
    tok = lm.tokenizer
    rows: list[dict] = []
    done = 0
    for group in groups:
        reference: dict[int, float] = {}
        for method, budget in runs:
            first = group[0]
            if on_step is not None:
                on_step(done, total, f"{first.kind} {first.length} {method}@{budget}")
            t0 = time.perf_counter()
            ctx = api.prefill(lm, first.context, method=method, budget=budget, chunk_size=chunk_size,
                              question=first.question if query_aware else None,
                              method_options=per.get(method, {}), backend=backend, truncate=truncate)
            prefill_seconds = time.perf_counter() - t0
            rep = ctx.report()
            for k, it in enumerate(group):
                limit = max_new_tokens or max_new_tokens_for(it, tok)
                ans = ctx.ask(it.question, max_new_tokens=limit, answer_prefix=it.answer_prefix)
                logprob = ctx.answer_logprob(it.question, it.reference, answer_prefix=it.answer_prefix)
                if method == FULL:
                    reference[k] = logprob
                rows.append({
                    "kind": it.kind, "length": it.length, "depth": it.depth, "sample": it.sample,
                    "method": method, "budget": str(budget),
                    "score": score_answers(it.answers, it.metric, ans.text),
                    "logprob": logprob, "logprob_delta": logprob - reference[k],
                    "kv_ratio": rep["kv_ratio"], "prefill_seconds": prefill_seconds,
                    "seed": it.seed, "question": it.question, "answers": list(it.answers), "prediction": ans.text,
                })
            del ctx
            done += 1
    if on_step is not None:
        on_step(done, total, "done")
    cfg = {"model": getattr(lm, "name", "custom"), "methods": [FULL] + methods, "budgets": [str(b) for b in budgets],
           "chunk_size": chunk_size, "query_aware": query_aware,
           "method_options": {m: o for m, o in per.items() if o}, "prefills": total, **(config or {})}
    for r in rows:  # JSON has no NaN/inf: an impossible answer (-inf) is reported as None
        for key in ("logprob", "logprob_delta"):
            if not math.isfinite(r[key]):
                r[key] = None
    return EvalResult(rows=rows, config=cfg)


def estimate_prefill_tokens(items: Sequence[EvalItem], n_runs: int, query_aware: bool = False) -> int:
    """Tokens prefilled by a run with ``n_runs`` (full + methods x budgets) per context."""
    return sum(g[0].length for g in _groups(items, query_aware)) * n_runs


__all__ = ["EvalItem", "EvalResult", "COLUMNS", "run_eval", "items_from_tasks", "synthetic_items",
           "question_items", "parse_lengths", "parse_kinds", "parse_depths", "parse_list", "validate_methods",
           "split_options", "max_new_tokens_for", "estimate_prefill_tokens"]
