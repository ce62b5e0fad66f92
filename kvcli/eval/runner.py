"""Running evaluations: every item through the full cache and every method x budget x scoring.

One loaded model serves the whole run.  Items that share a context (a user's document
with several questions) are prefilled once per (method, budget, scoring), except with a
scoring that uses the question (query-aware), which prefills once per question; synthetic
tasks each have their own context.  The full cache is prefilled once per context, first,
and is the reference for the answer-likelihood delta of every other run on that context.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..api import LoadedModel, prefill, resolve_scoring
from ..core import defaults
from ..core.budget import FULL as FULL_BUDGET
from ..core.budget import Budget, parse_budget
from ..core.errors import KvcliError
from ..methods import make_method, split_options
from . import journal as journal_mod
from .journal import Journal
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
    # Where scored methods' statistics come from (``kvcli.engine.scoring``): each is its own
    # run.  ``auto`` here is reconstruction: an evaluated context is asked after prefill.
    scorings: Sequence[str] = (defaults.SCORING,)
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


def max_new_tokens_for(item: EvalItem, tokenizer, floor: int = 16) -> int:
    """Room for the answer: ``floor`` tokens for one short answer (the model's
    ``LoadedModel.answer_tokens``: 16 for a base model, 48 for an instruction-tuned one that
    restates the question first), more for lists."""
    need = len(tokenizer.encode(", ".join(item.answers), add_special_tokens=False))
    return int(min(256, max(floor, need + 4 * len(item.answers) + 8)))


# ------------------------------------------------------------------ the run
def _groups(items: Sequence[EvalItem]) -> list[list[EvalItem]]:
    """Items that share a context (one prefill serves them, unless the scoring uses the question)."""
    groups: dict[str, list[EvalItem]] = {}
    for it in items:
        groups.setdefault(it.context, []).append(it)
    return list(groups.values())


def _uses_question(scoring: str | None) -> bool:
    return scoring is not None and "question" in scoring


#: One run on a context: ``(method, budget, scoring)``.
Run = tuple[str, Budget, str | None]


def plan_runs(settings: EvalSettings) -> list[Run]:
    """``(method, budget, scoring)`` of every run on a context, the full cache first.  Plain
    PoD keeps every token (one run, whatever the budgets); methods that score nothing run once
    per budget (scoring ``None``)."""
    methods, budgets, per = validate_methods(settings.methods, settings.budgets, settings.method_options)
    # auto: an evaluated context is asked after prefill (as a saved one is); an explicit
    # question scoring gets each item's question.
    scorings = list(dict.fromkeys(resolve_scoring(s, has_questions=s != "auto") for s in settings.scorings))
    runs: list[Run] = [(FULL, FULL_BUDGET, None)]
    for m in methods:
        meth = make_method(m, **per[m])
        # each run names the budget as its method runs it ("auto" made the method's own allocation)
        for b in [FULL_BUDGET] if not meth.uses_budget else dict.fromkeys(map(meth.budget_for, budgets)):
            runs += [(m, b, s) for s in scorings] if meth.needs_scores and not b.is_full else [(m, b, None)]
    return runs


def _steps(items: Sequence[EvalItem], runs: Sequence[Run]) -> list[tuple[Run, list[EvalItem]]]:
    """Every prefill in run order: ``(run, the items answered from it)``: for each context,
    each run, once (or once per question when the scoring uses it)."""
    return [
        (run, part)
        for group in _groups(items)
        for run in runs
        for part in ([[it] for it in group] if _uses_question(run[2]) else [group])
    ]


def _label(run: Run) -> str:
    method, budget, scoring = run
    return method if budget.is_full else f"{method}{'/' + scoring if scoring else ''}@{budget}"


def _answer_limit(item: EvalItem, settings: EvalSettings, tokenizer: Any, answer_tokens: int) -> int:
    return settings.max_new_tokens or max_new_tokens_for(item, tokenizer, answer_tokens)


def step_keys(lm: LoadedModel, items: Sequence[EvalItem], settings: EvalSettings) -> list[str]:
    """The journal key of every prefill of ``run_eval(lm, items, settings)``, in run order."""
    runs = plan_runs(settings)
    _, _, per = validate_methods(settings.methods, settings.budgets, settings.method_options)
    base = {
        "model": journal_mod.model_identity(lm),
        "code": journal_mod.code_identity(),
        "chunk_size": settings.chunk_size,
        "backend": settings.backend,
        "truncate": settings.truncate,
    }
    keys = []
    for (method, budget, scoring), part in _steps(items, runs):
        questions = [
            {
                "question": it.question,
                "answers": it.answers,
                "metric": it.metric,
                "answer_prefix": it.answer_prefix,
                "max_new_tokens": _answer_limit(it, settings, lm.tokenizer, lm.answer_tokens),
            }
            for it in part
        ]
        run = {
            "method": method,
            "budget": str(budget),
            "scoring": scoring,
            "options": per.get(method, {}),
            "files": journal_mod.cache_files_identity(method),
        }
        keys.append(journal_mod.prefill_key(base, part[0].context, questions, run))
    return keys


def _kept(journal: Journal | None, key: str, part: Sequence[EvalItem]) -> list[EvalRow] | None:
    """The journal's rows for this prefill, if it has them for exactly these questions."""
    rows = journal.get(key) if journal is not None else None
    if (
        rows is None
        or len(rows) != len(part)
        or any(r.question != it.question for r, it in zip(rows, part, strict=True))
    ):
        return None
    return rows


def reused_steps(
    lm: LoadedModel, items: Sequence[EvalItem], settings: EvalSettings, journal: Journal | None
) -> list[bool]:
    """Which prefills of the run the journal already has (in run order)."""
    steps = _steps(items, plan_runs(settings))
    if journal is None:
        return [False] * len(steps)
    keys = step_keys(lm, items, settings)
    return [_kept(journal, k, part) is not None for k, (_, part) in zip(keys, steps, strict=True)]


def run_eval(
    lm: LoadedModel,
    items: Sequence[EvalItem],
    settings: EvalSettings | None = None,
    on_step: Callable[[int, int, str], None] | None = None,
    config: dict | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    journal: Journal | None = None,
) -> EvalResult:
    """Evaluate ``items`` with the full cache and every method x budget x scoring of ``settings``.

    Returns one row per (item, run).  ``on_step(done, total, label)`` is called before each
    prefill that runs (``done`` counts finished prefills, ``total`` those to run) and once at
    the end; ``on_chunk(done, total)`` after every chunk of a prefill (tokens).  ``config`` is
    added to the result's settings (what the caller wants written with the results).  With a
    ``journal`` (``eval.journal``), a prefill it already has is not run again (its rows are
    taken from it), and every prefill that runs is written to it as soon as it is answered.
    """
    settings = settings or EvalSettings()
    if not items:
        raise KvcliError("nothing to evaluate: no tasks or questions")
    methods, budgets, per = validate_methods(settings.methods, settings.budgets, settings.method_options)
    runs = plan_runs(settings)
    steps = _steps(items, runs)
    keys = step_keys(lm, items, settings) if journal is not None else [""] * len(steps)
    kept = [_kept(journal, k, part) for k, (_, part) in zip(keys, steps, strict=True)]
    total = sum(k is None for k in kept)
    tok = lm.tokenizer
    rows: list[EvalRow] = []
    reference: dict[int, float] = {}  # the full cache's answer log-likelihood, per item
    done = 0
    for (run, part), key, old in zip(steps, keys, kept, strict=True):
        method, budget, scoring = run
        if old is not None:  # from the journal; the item's own numbering (sample, depth) kept
            for it, row in zip(part, old, strict=True):
                if method == FULL:
                    reference[id(it)] = row.logprob if row.logprob is not None else -math.inf
                rows.append(
                    replace(row, kind=it.kind, length=it.length, depth=it.depth, sample=it.sample, seed=it.seed)
                )
            continue
        first = part[0]
        if on_step is not None:
            tag = f"/{scoring}" if scoring else ""
            on_step(done, total, f"{first.kind} {first.length} {method}{tag}@{budget}")
        t0 = time.perf_counter()
        ctx = prefill(
            lm,
            first.context,
            method=method,
            budget=budget,
            chunk_size=settings.chunk_size,
            questions=[first.question] if _uses_question(scoring) else None,
            scoring=scoring or "window",
            method_options=per.get(method, {}),
            backend=settings.backend,
            truncate=settings.truncate,
            on_progress=on_chunk,
        )
        prefill_seconds = time.perf_counter() - t0
        kv_ratio = ctx.report().kv_ratio
        new_rows = []
        for it in part:
            ans = ctx.ask(
                it.question,
                max_new_tokens=_answer_limit(it, settings, tok, lm.answer_tokens),
                answer_prefix=it.answer_prefix,
            )
            logprob = ctx.answer_logprob(it.question, it.reference, answer_prefix=it.answer_prefix)
            if method == FULL:
                reference[id(it)] = logprob
            delta = logprob - reference[id(it)]
            new_rows.append(
                EvalRow(
                    kind=it.kind,
                    length=it.length,
                    depth=it.depth,
                    sample=it.sample,
                    method=method,
                    budget=str(ctx.engine.budget),  # what ran (a method that ranks nothing: uniform)
                    scoring=scoring,
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
        if journal is not None:
            journal.add(key, _label(run), new_rows, per.get(method))
        rows += new_rows
        done += 1
    if on_step is not None:
        on_step(done, total, "done")
    scorings = sorted({s for _, _, s in runs if s})
    cfg = {
        "model": getattr(lm, "name", "custom"),
        "methods": [FULL, *methods],
        "budgets": [str(b) for b in budgets],
        "scorings": scorings,
        "chunk_size": settings.chunk_size,
        "query_aware": any(_uses_question(s) for s in scorings),
        "method_options": {m: o for m, o in per.items() if o},
        "prefills": len(steps),
        "reused_prefills": len(steps) - total,
        **(config or {}),
    }
    return EvalResult(rows=rows, config=cfg)


@dataclass
class EvalPlan:
    """The work of a run, known before it starts: what ``kvcli eval`` prints up front."""

    runs: list[str]  # labels, the full cache first: ``full``, ``pod``, ``snapkv/recon@0.5``, ...
    contexts: int  # distinct contexts (documents)
    prefills: int
    tokens: int  # prefilled, all prefills together
    lengths: list[int]  # the distinct context lengths, shortest first
    answers: int  # questions answered, all runs together
    decode_tokens: int  # at most, decoded and teacher-forced for the answers, all runs together
    steps: list[tuple[int, bool]] = field(default_factory=list)  # every prefill in run order: (tokens, scored)
    scored: tuple[str, str] | None = None  # (method, scoring) of the first scored run, if any
    reused: int = 0  # prefills the journal already has (not counted above)


def plan_eval(
    items: Sequence[EvalItem],
    settings: EvalSettings,
    tokenizer: Any,
    answer_tokens: int = 16,
    reused: Sequence[bool] | None = None,
) -> EvalPlan:
    """What ``run_eval(items, settings)`` will do: prefills and their tokens, answers and the
    most tokens they decode (each answer's budget plus its reference, teacher-forced).
    ``reused``: the prefills the journal already has (``reused_steps``), which do not run."""
    runs = plan_runs(settings)
    steps = _steps(items, runs)
    reused = list(reused) if reused is not None else [False] * len(steps)
    todo = [(run, part) for (run, part), old in zip(steps, reused, strict=True) if not old]
    decode = {
        id(it): _answer_limit(it, settings, tokenizer, answer_tokens)
        + len(tokenizer.encode(" " + it.reference, add_special_tokens=False))
        for it in items
    }
    return EvalPlan(
        runs=[_label(run) for run in runs],
        contexts=len(_groups(items)),
        prefills=len(todo),
        tokens=sum(part[0].length for _, part in todo),
        lengths=sorted({it.length for it in items}),
        answers=sum(len(part) for _, part in todo),
        decode_tokens=sum(decode[id(it)] for _, part in todo for it in part),
        steps=[(part[0].length, run[2] is not None) for run, part in todo],
        scored=next(((m, s) for m, _, s in runs if s is not None), None),
        reused=len(steps) - len(todo),
    )


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
    "EvalPlan",
    "plan_eval",
    "step_keys",
    "reused_steps",
]
