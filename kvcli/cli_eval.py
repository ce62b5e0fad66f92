"""``kvcli eval``: quality of every method x budget against the full cache.

Synthetic long-context tasks (generated offline with the model's tokenizer), or a user's
own document with a JSONL file of question/answer pairs.  Parsing and rendering only: the
work is in ``kvcli.eval.runner`` and ``kvcli.eval.report``.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console

from .cli import AttnOpt, ChunkOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, OptionOpt, QuietOpt, TruncOpt, app, err
from .errors import KvcliError

DEFAULT_OUT = "kvcli-eval-results"
DEFAULT_LENGTHS = "4096"
DEFAULT_BUDGETS = "0.5"


def _eval_progress(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("prefills"),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                    console=err, transient=False)


@app.command("eval")
def eval_command(
    document: Annotated[Optional[str], typer.Argument(help="Your own document (with --questions); omit it for the synthetic tasks.")] = None,
    questions: Annotated[Optional[str], typer.Option("--questions", help='JSONL file of {"question": ..., "answer": ...} (or "answers": [...], optional "metric": any|all, "answer_prefix") about DOCUMENT.')] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Comma-separated methods (default: all; see `kvcli methods`). The full cache always runs as the reference.")] = None,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated budgets: ratios in (0, 1] or token counts.")] = DEFAULT_BUDGETS,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Comma-separated task kinds: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, fwe (default: all).")] = None,
    lengths: Annotated[Optional[str], typer.Option("--lengths", help="Comma-separated context lengths in tokens, e.g. 2K,4K,8K (default 4096).")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Tasks per kind and length (default 1); niah_single cycles through --depths.")] = None,
    depths: Annotated[Optional[str], typer.Option("--depths", help="Needle depths for niah_single (default 0.1,0.3,0.5,0.7,0.9).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic tasks (same seed, same tasks).")] = 0,
    query_aware: Annotated[bool, typer.Option("--query-aware/--no-query-aware", help="Give each question to prefill, for query-aware scoring (one prefill per question).")] = False,
    chunk_size: ChunkOpt = None,
    option: OptionOpt = None,
    model: ModelOpt = "embedded",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    truncate: TruncOpt = False,
    out: Annotated[str, typer.Option("--out", help="Directory for results.csv, results.json and results.md.")] = DEFAULT_OUT,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Directory for plots: needle depth x length heatmaps and score against budget.")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Measure answer quality of methods x budgets against the full cache."""
    from .backends import resolve_backend
    from .eval import runner
    from .eval.report import prepare_dir, rich_table, write_plots, write_results
    from .eval.tasks import MIN_LENGTH
    from .methods import method_names
    from .presets import parse_options

    # ---- everything the user gave is checked before the model loads ------------------------
    synthetic_opts = {"--tasks": tasks, "--lengths": lengths, "--samples": samples, "--depths": depths}
    if document is not None and questions is None:
        raise KvcliError("a DOCUMENT needs --questions FILE.jsonl with its question/answer pairs")
    if questions is not None and document is None:
        raise KvcliError("--questions needs the DOCUMENT they are about: kvcli eval DOCUMENT --questions FILE.jsonl")
    if document is not None:
        given = [k for k, v in synthetic_opts.items() if v is not None]
        if given:
            raise KvcliError(f"{', '.join(given)} only apply to the synthetic tasks, not to a DOCUMENT with --questions")
    method_list = runner.parse_list(methods, "methods") if methods is not None else method_names()
    method_list, budget_list, _ = runner.validate_methods(method_list, runner.parse_list(budgets, "budgets"),
                                                          parse_options(option))
    chunk = 512 if chunk_size is None else chunk_size
    if chunk < 1:
        raise KvcliError(f"invalid --chunk-size {chunk}: it must be a positive integer")
    backend = resolve_backend(attn, device)
    config: dict = {}
    if document is None:
        kinds = runner.parse_kinds(tasks)
        length_list = runner.parse_lengths(lengths or DEFAULT_LENGTHS)
        depth_list = runner.parse_depths(depths)
        n_samples = 1 if samples is None else samples
        if n_samples < 1:
            raise KvcliError(f"invalid --samples {n_samples}: it must be at least 1")
        for kind in kinds:
            for n in length_list:
                if n < MIN_LENGTH[kind]:
                    raise KvcliError(f"length {n} is too small for task {kind}: minimum is {MIN_LENGTH[kind]} tokens")
        config.update(kinds=kinds, lengths=length_list, samples=n_samples, seed=seed,
                      depths=depth_list or [0.1, 0.3, 0.5, 0.7, 0.9])
    else:
        from .api import open_document
        from .eval.scoring import load_questions

        qs = load_questions(questions)
        doc = open_document(document)
        config.update(document=document, questions=questions, n_questions=len(qs))
    out_dir = prepare_dir(out)
    plot_dir = prepare_dir(plot, "--plot") if plot else None

    # ---- the run ----------------------------------------------------------------------------
    from . import api

    lm = api.load_model(model, device=device, dtype=dtype, quiet=quiet or as_json)
    if document is None:
        limit = lm.max_positions
        if limit and max(length_list) + api.QUESTION_RESERVE > limit:
            raise KvcliError(f"--lengths: {max(length_list)} tokens is too long for this model "
                             f"({limit} positions, {api.QUESTION_RESERVE} reserved for the question and answer)")
        items = runner.synthetic_items(lm.tokenizer, kinds, length_list, n_samples, seed, depth_list)
    else:
        items = runner.question_items(doc.text, qs, lm.tokenizer)

    progress = _eval_progress(quiet or as_json)
    kwargs = dict(methods=method_list, budgets=budget_list, chunk_size=chunk, query_aware=query_aware,
                  method_options=parse_options(option), backend=backend, config=config, truncate=truncate)
    t0 = time.perf_counter()
    if progress is None:
        result = runner.run_eval(lm, items, **kwargs)
    else:
        with progress:
            bar = progress.add_task("", total=None)

            def on_step(done: int, total: int, label: str) -> None:
                progress.update(bar, completed=done, total=total, description=label)

            result = runner.run_eval(lm, items, on_step=on_step, **kwargs)
    result.config["seconds"] = round(time.perf_counter() - t0, 1)
    command = "kvcli " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result.config["command"] = command
    paths = write_results(result, out_dir, command=command)
    plots = write_plots(result.rows, plot_dir) if plot_dir else []

    if as_json:
        from .eval.report import json_text

        print(json_text(result))
        if not quiet:
            Console(stderr=True).print(rich_table(result.rows))
    else:
        Console().print(rich_table(result.rows))
    if not quiet:
        where = ", ".join(str(p) for p in paths.values())
        err.print(f"Wrote {where}" + (f" and {len(plots)} plot(s) in {plot_dir}" if plots else ""),
                  highlight=False, soft_wrap=True)
