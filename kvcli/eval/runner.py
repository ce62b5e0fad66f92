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
from typing import Any

from ..api import LoadedModel, prefill
from ..core import defaults
from ..core.budget import FULL as FULL_BUDGET
from ..core.budget import Budget, parse_budget
from ..core.errors import KvcliError
from ..methods import make_method, split_options
from .rows import FULL, EvalResult, EvalRow
from .scoring import load_questions, score_answers
from .tasks import KINDS, MIN_LENGTH, Task, generate_suite


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


# ------------------------------------------------------------------ building items
def items_from_tasks(tasks: Sequence[Task]) -> list[EvalItem]:
    """Items from synthetic tasks; ``sample`` numbers the tasks of each (kind, length)."""
    seen: dict[tuple[str, int], int] = {}
    items = []
    for t in tasks:
        i = seen.get((t.kind, t.target_length), 0)
        seen[(t.kind, t.target_length)] = i + 1
        items.append(
            EvalItem(
                kind=t.kind,
                context=t.context,
                question=t.question,
                answers=list(t.answers),
                metric=t.metric,
                answer_prefix=t.answer_prefix,
                length=t.target_length,
                depth=t.depth,
                sample=i,
                seed=t.seed,
            )
        )
    return items


def synthetic_items(
    tokenizer,
    kinds: Sequence[str],
    lengths: Sequence[int],
    samples: int,
    seed: int,
    depths: Sequence[float] | None = None,
) -> list[EvalItem]:
    kw = {"depths": tuple(depths)} if depths else {}
    return items_from_tasks(generate_suite(kinds, lengths, samples, seed, tokenizer, **kw))


def question_items(text: str, questions: list[dict] | str, tokenizer) -> list[EvalItem]:
    """Items for a user's document and question/answer pairs (a list from
    ``scoring.load_questions`` or the path of a JSONL file)."""
    if isinstance(questions, str):
        questions = load_questions(questions)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    return [
        EvalItem(
            kind="questions",
            context=text,
            question=q["question"],
            answers=list(q["answers"]),
            metric=q["metric"],
            answer_prefix=str(q.get("answer_prefix") or ""),
            length=n,
            sample=i,
        )
        for i, q in enumerate(questions)
    ]


# ------------------------------------------------------------------ what to run
@dataclass
class SyntheticTasks:
    """Which synthetic tasks: ``samples`` per (kind, length) from one ``seed``; niah_single
    cycles through ``depths``."""

    kinds: list[str] = field(default_factory=lambda: defaults.EVAL_TASKS.split(","))
    lengths: list[int] = field(default_factory=lambda: [int(n) for n in defaults.EVAL_LENGTHS.split(",")])
    samples: int = defaults.EVAL_SAMPLES
    seed: int = 0
    depths: list[float] = field(default_factory=lambda: list(defaults.EVAL_DEPTHS))

    def check(self, max_positions: int = 0) -> None:
        """One-line errors for what cannot be generated (or does not fit ``max_positions``)."""
        for k in self.kinds:
            if k not in KINDS:
                raise KvcliError(f"unknown task kind {k!r} (choose from {', '.join(KINDS)}, or all)")
        if self.samples < 1:
            raise KvcliError(f"samples {self.samples} is invalid: it must be at least 1", option="samples")
        for kind in self.kinds:
            for n in self.lengths:
                if n < MIN_LENGTH[kind]:
                    raise KvcliError(f"length {n} is too small for task {kind}: minimum is {MIN_LENGTH[kind]} tokens")
        longest = max(self.lengths, default=0)
        if max_positions and longest + defaults.QUESTION_RESERVE > max_positions:
            raise KvcliError(
                f"lengths: {longest} tokens is too long for this model ({max_positions} positions, "
                f"{defaults.QUESTION_RESERVE} reserved for the question and answer)",
                option="lengths",
            )

    def items(self, tokenizer: Any) -> list[EvalItem]:
        return synthetic_items(tokenizer, self.kinds, self.lengths, self.samples, self.seed, self.depths)

    def config(self) -> dict:
        return {
            "kinds": self.kinds,
            "lengths": self.lengths,
            "samples": self.samples,
            "seed": self.seed,
            "depths": self.depths,
        }


@dataclass
class EvalSettings:
    """How to evaluate: the methods and budgets compared with the full cache, and how each prefill runs.

    ``method_options``: ``KEY`` / ``METHOD.KEY`` entries (see ``split_options``).
    ``max_new_tokens`` overrides ``max_new_tokens_for``."""

    methods: Sequence[str] = ()
    budgets: Sequence[str | float | Budget] = (0.5,)
    chunk_size: int = defaults.CHUNK_SIZE
    query_aware: bool = False
    method_options: dict = field(default_factory=dict)
    backend: str = "sdpa"
    truncate: bool = False
    max_new_tokens: int | None = None


def validate_methods(
    methods: Sequence[str], budgets: Sequence[str | float | Budget], options: dict | None = None
) -> tuple[list[str], list[Budget], dict[str, dict]]:
    """Check names, budgets and options before any model is loaded (one-line errors); the
    options per method (``split_options``).  ``full`` is always run (once, as the reference),
    so it is dropped from ``methods``."""
    methods = [m for m in dict.fromkeys(methods) if m != FULL]
    parsed = list(dict.fromkeys(b if isinstance(b, Budget) else parse_budget(b) for b in budgets))
    if methods and not parsed:
        raise KvcliError("budgets: give at least one budget", option="budgets")
    per = split_options(options or {}, methods)
    for m in methods:
        make_method(m, **per[m])
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
    lm: LoadedModel,
    items: Sequence[EvalItem],
    settings: EvalSettings | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
    config: dict | None = None,
) -> EvalResult:
    """Evaluate ``items`` with the full cache and every method x budget of ``settings``.

    Returns one row per (item, run).  ``on_step(done, total, label)`` is called before each
    prefill (``done`` counts finished prefills) and once at the end.  ``config`` is added to
    the result's settings (what the caller wants written with the results).
    """
    settings = settings or EvalSettings()
    if not items:
        raise KvcliError("nothing to evaluate: no tasks or questions")
    methods, budgets, per = validate_methods(settings.methods, settings.budgets, settings.method_options)
    runs: list[tuple[str, Budget]] = [(FULL, FULL_BUDGET)]
    for m in methods:  # plain PoD keeps every token: one run, whatever the budgets
        runs += [(m, FULL_BUDGET)] if not make_method(m, **per[m]).uses_budget else [(m, b) for b in budgets]
    groups = _groups(items, settings.query_aware)
    total = len(groups) * len(runs)
    tok = lm.tokenizer
    rows: list[EvalRow] = []
    done = 0
    for group in groups:
        reference: dict[int, float] = {}
        for method, budget in runs:
            first = group[0]
            if on_step is not None:
                on_step(done, total, f"{first.kind} {first.length} {method}@{budget}")
            t0 = time.perf_counter()
            ctx = prefill(
                lm,
                first.context,
                method=method,
                budget=budget,
                chunk_size=settings.chunk_size,
                question=first.question if settings.query_aware else None,
                method_options=per.get(method, {}),
                backend=settings.backend,
                truncate=settings.truncate,
            )
            prefill_seconds = time.perf_counter() - t0
            kv_ratio = ctx.report().kv_ratio
            for k, it in enumerate(group):
                limit = settings.max_new_tokens or max_new_tokens_for(it, tok)
                ans = ctx.ask(it.question, max_new_tokens=limit, answer_prefix=it.answer_prefix)
                logprob = ctx.answer_logprob(it.question, it.reference, answer_prefix=it.answer_prefix)
                if method == FULL:
                    reference[k] = logprob
                delta = logprob - reference[k]
                rows.append(
                    EvalRow(
                        kind=it.kind,
                        length=it.length,
                        depth=it.depth,
                        sample=it.sample,
                        method=method,
                        budget=str(budget),
                        score=score_answers(it.answers, it.metric, ans.text),
                        # JSON has no NaN/inf: an impossible answer (-inf) is reported as None
                        logprob=logprob if math.isfinite(logprob) else None,
                        logprob_delta=delta if math.isfinite(delta) else None,
                        kv_ratio=kv_ratio,
                        prefill_seconds=prefill_seconds,
                        seed=it.seed,
                        question=it.question,
                        answers=list(it.answers),
                        prediction=ans.text,
                    )
                )
            del ctx
            done += 1
    if on_step is not None:
        on_step(done, total, "done")
    cfg = {
        "model": getattr(lm, "name", "custom"),
        "methods": [FULL, *methods],
        "budgets": [str(b) for b in budgets],
        "chunk_size": settings.chunk_size,
        "query_aware": settings.query_aware,
        "method_options": {m: o for m, o in per.items() if o},
        "prefills": total,
        **(config or {}),
    }
    return EvalResult(rows=rows, config=cfg)


def estimate_prefill_tokens(items: Sequence[EvalItem], n_runs: int, query_aware: bool = False) -> int:
    """Tokens prefilled by a run with ``n_runs`` (full + methods x budgets) per context."""
    return sum(g[0].length for g in _groups(items, query_aware)) * n_runs


__all__ = [
    "EvalItem",
    "EvalSettings",
    "SyntheticTasks",
    "run_eval",
    "items_from_tasks",
    "synthetic_items",
    "question_items",
    "validate_methods",
    "split_options",
    "max_new_tokens_for",
    "estimate_prefill_tokens",
]
