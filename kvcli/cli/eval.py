"""``kvcli eval``: quality of every method x budget against the full cache.

Synthetic long-context tasks (generated offline with the model's tokenizer), or a user's
own document with a JSONL file of question/answer pairs.  Parsing and rendering only: the
work is in ``kvcli.eval.runner`` and ``kvcli.eval.report``.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..core import defaults
from ..core.errors import KvcliError
from . import checks
from .common import load_model
from .eta import Eta, minutes_text, work_text
from .options import (
    AttnOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    NoAdapterOpt,
    OptionOpt,
    QuietOpt,
    TruncOpt,
    err,
    parse_list,
    parse_methods,
    parse_options,
    progress,
)

if TYPE_CHECKING:  # annotations only: the command body imports the library when it runs
    from ..eval.rows import EvalRow

KINDS_HELP = "niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, fwe"


# ---- parsing -------------------------------------------------------------------------------------
def parse_lengths(value: str) -> list[int]:
    """``2048,4K,16k`` -> token counts (K = 1024)."""
    out = []
    for p in parse_list(value, "--lengths"):
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


def parse_depths(value: str | None) -> list[float] | None:
    if value is None:
        return None
    out = []
    for p in parse_list(value, "--depths"):
        try:
            d = float(p)
        except ValueError:
            raise KvcliError(f"invalid depth {p!r}: give fractions in [0, 1]") from None
        if not 0.0 <= d <= 1.0:
            raise KvcliError(f"invalid depth {p!r}: it must be in [0, 1]")
        out.append(d)
    return out


def parse_kinds(value: str | None) -> list[str]:
    from ..eval.tasks import KINDS

    kinds = parse_list(value, "--tasks") if value is not None else list(KINDS)
    if value is not None and any(k == "all" for k in kinds):
        return list(KINDS)
    for k in kinds:
        if k not in KINDS:
            raise KvcliError(f"unknown task kind {k!r} (choose from {', '.join(KINDS)}, or all)")
    return list(dict.fromkeys(kinds))


# ---- rendering -----------------------------------------------------------------------------------
def score_table(rows: Sequence[EvalRow], title: str | None = None) -> Table:
    from ..eval.report import table_cells
    from ..eval.rows import FULL

    header, body = table_cells(rows)
    table = Table(title=title or "Scores (%; full cache = reference)", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for i, line in enumerate(body):
        table.add_row(*line, end_section=(i == 0 and line[0] == FULL))
    return table


def eval_command(
    document: Annotated[
        str | None, typer.Argument(help="Your own document (with --questions); omit it for the synthetic tasks.")
    ] = None,
    questions: Annotated[
        str | None,
        typer.Option(
            "--questions",
            help='JSONL file of {"question": ..., "answer": ...} (or "answers": [...], optional "metric": '
            'any|all, "answer_prefix") about DOCUMENT.',
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help=f"Comma-separated methods (default: {', '.join(defaults.HEADLINE_METHODS)}; --full: all; see "
            "`kvcli methods`). The full cache always runs as the reference.",
        ),
    ] = None,
    budgets: Annotated[
        str,
        typer.Option(
            "--budgets",
            help="Comma-separated budgets: ratios in (0, 1] or token counts, each optionally with the allocation: "
            ":auto (the default: each method's measured best), :heads, :relative, :global or :uniform.",
        ),
    ] = defaults.EVAL_BUDGETS,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks", help=f"Comma-separated task kinds: {KINDS_HELP} (default: {defaults.EVAL_TASKS}; --full: all)."
        ),
    ] = None,
    lengths: Annotated[
        str | None,
        typer.Option(
            "--lengths",
            help=f"Comma-separated context lengths in tokens, e.g. 2K,4K,8K (default {defaults.EVAL_LENGTHS}; "
            f"--full: {defaults.EVAL_FULL_LENGTHS}).",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--samples",
            help=f"Tasks per kind and length (default {defaults.EVAL_SAMPLES}; --full: {defaults.EVAL_FULL_SAMPLES}); "
            "niah_single cycles through --depths.",
        ),
    ] = None,
    depths: Annotated[
        str | None,
        typer.Option(
            "--depths",
            help=f"Needle depths for niah_single (default {','.join(map(str, defaults.EVAL_DEPTHS))}; --full: "
            f"{','.join(map(str, defaults.EVAL_FULL_DEPTHS))}).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic tasks (same seed, same tasks).")] = 0,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="The big grid: every method, every task kind, the --full lengths, samples and depths (hours on a "
            "CPU; the plan printed first says how long). Explicit options win.",
        ),
    ] = False,
    scoring: Annotated[
        str | None,
        typer.Option(
            "--scoring",
            help="Comma-separated scorings, each its own run of every scored method: auto (= recon here: an "
            "evaluated context is asked after prefill), recon, window, question, recon+question (question "
            "scorings prefill once per question).",
        ),
    ] = None,
    query_aware: Annotated[
        bool,
        typer.Option("--query-aware/--no-query-aware", help="Same as --scoring question."),
    ] = False,
    chunk_size: ChunkOpt = None,
    option: OptionOpt = None,
    model: ModelOpt = defaults.MODEL,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    no_adapter: NoAdapterOpt = False,
    truncate: TruncOpt = False,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Directory for results.csv, results.json and results.md, and journal.jsonl: every "
            "finished prefill's rows, written as the run goes; a later run in the same directory "
            "takes from it what it would compute again (the same model, code, task and settings), "
            "so a run that was cut off resumes.",
        ),
    ] = defaults.EVAL_OUT,
    rerun: Annotated[
        bool,
        typer.Option(
            "--rerun", help="Run every prefill again, taking nothing from --out's journal (it still gets the new rows)."
        ),
    ] = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="Directory for plots: the needle depth x length heatmap grid, score and logprob delta against budget.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure answer quality of methods x budgets against the full cache."""
    from ..core.budget import parse_budget
    from ..methods import has_option, make_method, method_names, split_options

    # ---- everything the user gave is checked before the model loads ------------------------
    # (first what needs no torch, so that a typo is reported at once)
    checks.run_options(device, dtype, attn)
    if chunk_size is not None:
        checks.chunk_size("--chunk-size", chunk_size)
    names = parse_methods(methods, method_names() if full else list(defaults.HEADLINE_METHODS))
    budget_list = [str(parse_budget(b)) for b in parse_list(budgets, "--budgets")]
    scored = [m for m in names if m != "full"]
    method_options = parse_options(option)
    if no_adapter and any(has_option(m, "adapter") for m in scored):
        method_options["adapter"] = "none"  # PoD runs training-free (to compare with its adapter)
    for m, opts in split_options(method_options, scored).items():
        make_method(m, **opts)

    synthetic_opts = {"--tasks": tasks, "--lengths": lengths, "--samples": samples, "--depths": depths}
    if document is not None and questions is None:
        raise KvcliError("a DOCUMENT needs --questions FILE.jsonl with its question/answer pairs")
    if questions is not None and document is None:
        raise KvcliError("--questions needs the DOCUMENT they are about: kvcli eval DOCUMENT --questions FILE.jsonl")
    if document is not None:
        given = [k for k, v in synthetic_opts.items() if v is not None]
        if given:
            raise KvcliError(
                f"{', '.join(given)} only apply to the synthetic tasks, not to a DOCUMENT with --questions"
            )
    from .. import api
    from ..attention.backends import resolve_backend
    from ..engine.engine import check_chunk_size
    from ..eval import runner
    from ..eval.journal import Journal
    from ..eval.report import json_text, prepare_dir, write_plots, write_results
    from ..eval.scoring import load_questions

    settings = runner.EvalSettings(
        methods=names,
        budgets=budget_list,
        chunk_size=defaults.CHUNK_SIZE if chunk_size is None else chunk_size,
        scorings=_scorings(scoring, query_aware),
        method_options=method_options,
        truncate=truncate,
    )
    runner.validate_methods(settings.methods, settings.budgets, settings.method_options)
    check_chunk_size(settings.chunk_size)
    settings.backend = resolve_backend(attn, device)
    suite = None
    if document is None:
        suite = runner.SyntheticTasks(
            kinds=parse_kinds(tasks if tasks is not None else ("all" if full else defaults.EVAL_TASKS)),
            lengths=parse_lengths(lengths or (defaults.EVAL_FULL_LENGTHS if full else defaults.EVAL_LENGTHS)),
            samples=samples if samples is not None else (defaults.EVAL_FULL_SAMPLES if full else defaults.EVAL_SAMPLES),
            seed=seed,
            depths=parse_depths(depths) or list(defaults.EVAL_FULL_DEPTHS if full else defaults.EVAL_DEPTHS),
        )
        suite.check()
        config = suite.config()
    else:
        qs = load_questions(questions)
        doc = api.open_document(document)
        config = {"document": document, "questions": questions, "n_questions": len(qs)}
    out_dir = prepare_dir(out, "--out")
    plot_dir = prepare_dir(plot, "--plot") if plot else None

    # ---- the run ----------------------------------------------------------------------------
    with Journal(out_dir, reuse=not rerun) as journal:  # opened (and locked) before the model loads
        if journal.cut_bytes and not (quiet or as_json):
            err.print(f"{journal.path}: removed a cut-off last line left by an interrupted run", highlight=False)
        lm = load_model(model, device, dtype, quiet or as_json)
        if suite is not None:
            suite.check(lm.max_positions)
            items = suite.items(lm.tokenizer)
        else:
            items = runner.question_items(doc.text, qs, lm.tokenizer)

        reused = runner.reused_steps(lm, items, settings, journal)
        if any(reused) and not (quiet or as_json):
            err.print(
                f"{sum(reused)} of {len(reused)} prefills are in {journal.path} already (--rerun runs them again)",
                highlight=False,
                soft_wrap=True,
            )
        planned = None if quiet or all(reused) else _plan(lm, items, settings, reused)
        bar = progress(not (quiet or as_json), unit="prefills")
        t0 = time.perf_counter()
        if bar is None or planned is None:
            result = runner.run_eval(lm, items, settings, config=config, journal=journal)
        else:
            with bar:
                task = bar.add_task("eval", total=None, info="")
                clock, steps = planned
                tokens, label, kind = [0], [""], ["prefill"]  # this prefill's tokens so far, label, kind of work

                def on_step(done: int, total: int, text: str) -> None:
                    if done:
                        clock.record("answers", 1)  # the previous prefill's questions, answered
                    tokens[0], label[0] = 0, text
                    kind[0] = "scored" if done < len(steps) and steps[done][1] else "prefill"
                    bar.update(task, completed=done, total=total, info=f"{text}  {clock.text()}")

                def on_chunk(done: int, total: int) -> None:
                    clock.record(kind[0], done - tokens[0])
                    tokens[0] = done
                    bar.update(task, info=f"{label[0]} {done:,}/{total:,} tokens  {clock.text()}")

                result = runner.run_eval(
                    lm, items, settings, on_step=on_step, config=config, on_chunk=on_chunk, journal=journal
                )
    result.config["seconds"] = round(time.perf_counter() - t0, 1)
    command = "kvcli " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.config["command"] = command
    paths = write_results(result, out_dir, command=command)
    plots = write_plots(result.rows, plot_dir) if plot_dir else []

    if as_json:
        print(json_text(result))
        if not quiet:
            Console(stderr=True).print(score_table(result.rows))
    else:
        Console().print(score_table(result.rows))
    if not quiet:
        where = ", ".join(str(p) for p in paths.values())
        err.print(
            f"Wrote {where}" + (f" and {len(plots)} plot(s) in {plot_dir}" if plots else ""),
            highlight=False,
            soft_wrap=True,
        )


def _plan(lm, items, settings, reused) -> tuple[Eta, list[tuple[int, bool]]]:
    """Print the planned work, priced at the speed measured here and now (a chunk with the full
    cache, one with a scored method, a few decode steps: seconds); the clock that keeps the
    ETA from then on, and the prefills in run order (tokens, scored)."""
    from ..eval.runner import plan_eval
    from ..eval.speed import measure_speed

    plan = plan_eval(items, settings, lm.tokenizer, lm.answer_tokens, reused)
    method, scoring = plan.scored or (None, defaults.SCORING)
    if "question" in scoring:  # no question to give a calibration chunk: time the window scoring
        scoring = "window"
    speed = measure_speed(lm, items[0].context, settings.chunk_size, scored=method, scoring=scoring)
    scored = sum(n for n, s in plan.steps if s)
    eta = Eta(
        {"prefill": plan.tokens - scored, "scored": scored, "answers": plan.prefills},
        prior={
            "prefill": speed.prefill,
            "scored": speed.scored or speed.prefill,
            "answers": plan.decode_tokens * speed.decode / max(1, plan.prefills),
        },
    )
    rates = f"{1 / speed.prefill:,.0f} tok/s prefill" + (
        f" ({1 / speed.scored:,.0f} with {method}'s {scoring} scoring)" if speed.scored else ""
    )
    err.print(
        f"Plan: {work_text(plan.prefills, plan.lengths)} ({plan.tokens:,} tokens: {plan.contexts} "
        f"context{'s' if plan.contexts != 1 else ''} x {len(plan.runs)} runs: {', '.join(plan.runs)}), "
        f"{plan.answers:,} answers; {minutes_text(eta.planned_seconds() or 0)} at the speed measured now "
        f"({rates}, {1 / speed.decode:,.1f} tok/s decode)",
        highlight=False,
        soft_wrap=True,
    )
    return eta, plan.steps


def _scorings(value: str | None, query_aware: bool) -> list[str]:
    """``--scoring`` as a list (``--query-aware`` adds ``question``), checked before any model loads."""
    from ..api import resolve_scoring

    names = parse_list(value, "--scoring") if value else ([] if query_aware else [defaults.SCORING])
    if query_aware and "question" not in names:
        names.append("question")
    for name in names:
        resolve_scoring(name, has_questions=True)
    return names
