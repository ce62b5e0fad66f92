"""``kvcli batch``: many documents, one set of settings, one JSON line each.

Arguments are checked, the documents found and the results file opened (and locked)
before any model library loads.  Progress: a Rich display on a terminal (documents done,
tokens/s, ETA), plain log lines with ``--quiet`` or when stdout is not a terminal; a
summary line at the end either way.  Exit status 3 when some document failed (the run
went on; each failed line says why).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from ..core import defaults
from ..core.errors import KvcliError
from . import checks
from .config import run_settings
from .eta import Eta, clock_text
from .options import (
    AllocationOpt,
    AttnOpt,
    BudgetOpt,
    ChunkOpt,
    DeviceOpt,
    DtypeOpt,
    MaxNewOpt,
    MethodOpt,
    ModelOpt,
    OptionOpt,
    PresetOpt,
    ScoringOpt,
    SeedOpt,
    TempOpt,
    TopPOpt,
    TruncOpt,
    err,
    parse_options,
)

#: Exit status of a run in which some document failed (README, "Exit status").
SOME_FAILED = 3
MAX_WORKERS = 256


def batch(
    docs: Annotated[
        list[str], typer.Argument(help="Documents: files, folders (searched recursively) or glob patterns.")
    ],
    ask: Annotated[list[str] | None, typer.Option("--ask", help="A question for every document (repeatable).")] = None,
    questions: Annotated[
        str | None,
        typer.Option("--questions", help='A JSONL file of questions for every document, {"question": "..."} a line.'),
    ] = None,
    summarize: Annotated[bool, typer.Option("--summarize", help="Summarize every document.")] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            help="Results file (JSONL), appended to; a rerun skips documents done with the same settings. "
            "Default: stdout (no resume).",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-w", help="Worker processes, each loading the model once (with --ray: actors).")
    ] = 1,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Run on a Ray cluster at ADDRESS (auto, host:6379, ray://host:10001); --ray alone starts a local "
            "Ray. Needs pip install 'kvcli[ray]'.",
        ),
    ] = None,
    kv_memory: Annotated[
        str | None,
        typer.Option(
            "--kv-memory",
            help="Choose each document's budget so its compressed cache fits this size (200MB, 1.5GB, 512MiB), "
            "from the model's KV bytes per token; instead of --budget.",
        ),
    ] = None,
    save_contexts: Annotated[
        str | None,
        typer.Option(
            "--save-contexts",
            help="Also write each document's context as DIR/<name>-<sha256>.kvc, for a later `kvcli ask` "
            "(on a Ray cluster DIR must be on a filesystem the workers share).",
        ),
    ] = None,
    model: ModelOpt = defaults.MODEL,
    method: MethodOpt = None,
    budget: BudgetOpt = None,
    preset: PresetOpt = None,
    option: OptionOpt = None,
    scoring: ScoringOpt = None,
    allocation: AllocationOpt = None,
    chunk_size: ChunkOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = None,
    truncate: TruncOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    attn: AttnOpt = "auto",
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Plain log lines instead of the progress display.")
    ] = False,
) -> None:
    """Run many documents (ask or summarize each), one JSON line per document."""
    from ..batch.discover import discover
    from ..batch.spec import BatchSpec, load_questions_file, parse_size

    checks.generation(max_new_tokens, temperature, top_p)
    checks.run_options(device, dtype, attn)
    asked = list(ask or [])
    if questions is not None:
        asked += load_questions_file(questions)
    if summarize and asked:
        raise KvcliError("--summarize and --ask/--questions: choose one (a run either summarizes or answers)")
    if not summarize and not asked:
        raise KvcliError("say what to do with each document: --ask QUESTION, --questions FILE.jsonl or --summarize")
    if not 1 <= workers <= MAX_WORKERS:
        raise KvcliError(f"--workers {workers} is invalid: give 1 to {MAX_WORKERS}")
    if ray is not None and importlib.util.find_spec("ray") is None:
        raise KvcliError("--ray needs Ray, which is not installed: pip install 'kvcli[ray]'")
    memory = parse_size(kv_memory) if kv_memory is not None else None
    if memory is not None and budget is not None:
        raise KvcliError("--kv-memory chooses each document's budget: give it or --budget, not both")
    settings = run_settings(
        preset=preset,
        method=method,
        budget=budget,
        chunk_size=chunk_size,
        options=parse_options(option),
        scoring=scoring,
        allocation=allocation,
    )
    if memory is not None and settings.method in ("full", "pod"):
        raise KvcliError(
            f"--kv-memory needs a method that compresses to a budget ({settings.method} does not): "
            "e.g. --method snapkv or --preset balanced"
        )
    paths = discover(docs)
    spec = BatchSpec(
        model=model,
        method=settings.method,
        budget=str(settings.budget),
        options=dict(settings.options),
        scoring=settings.scoring,
        chunk_size=settings.chunk_size,
        questions=tuple(asked),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        truncate=truncate,
        kv_memory=memory,
        device=device,
        dtype=dtype,
        attn=attn,
    )
    if save_contexts is not None:
        folder = Path(save_contexts)
        if folder.exists() and not folder.is_dir():
            raise KvcliError(f"--save-contexts {save_contexts}: not a directory")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KvcliError(f"--save-contexts {save_contexts}: cannot create it ({exc.strerror})") from None
    _run(paths, spec, output, workers, ray, quiet, save_contexts)


def _run(
    paths: list[str], spec: Any, output: str | None, workers: int, ray: str | None, quiet: bool, contexts: str | None
) -> None:
    from ..batch.results import ResultsWriter
    from ..batch.run import run_batch
    from ..batch.runners import InProcessRunner, ProcessRunner, RayRunner, Runner
    from ..batch.work import SaveContexts

    hook = SaveContexts(contexts) if contexts is not None else None
    runner: Runner
    if ray is not None:
        runner = RayRunner(spec, workers, address=None if ray == "local" else ray, hook=hook)
    elif workers > 1:
        runner = ProcessRunner(spec, workers, hook=hook)
    else:
        runner = InProcessRunner(spec, hook=hook)
    live = not quiet and sys.stdout.isatty() and err.is_terminal
    with ResultsWriter(output) as writer:  # opened (and locked) before any model library loads
        if writer.cut_bytes:
            err.print(
                f"{output}: removed a cut-off last line ({writer.cut_bytes} bytes) left by an interrupted run",
                markup=False,
                highlight=False,
            )
        view = LiveView(runner) if live else LogView(runner)
        with view:
            summary = run_batch(paths, spec, runner, writer, on_line=view.line, on_plan=view.plan)
    where = f"; results in {output}" if output else ""
    err.print(
        f"batch: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped (done already) of "
        f"{summary.documents} documents; {summary.context_tokens:,} tokens in {clock_text(summary.seconds)} "
        f"({summary.tokens_per_second:,.0f} tok/s, {summary.documents_per_hour:,.0f} documents/h){where}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if summary.failed:
        raise typer.Exit(SOME_FAILED)


# ---- --ray [ADDRESS] ------------------------------------------------------------------------------
_ADDRESS_RE = re.compile(r"^(auto|local|[a-z][a-z0-9+.-]*://\S+|[A-Za-z0-9_.-]+:[0-9]+)$")


def ray_argv(args: list[str]) -> list[str]:
    """``--ray`` takes an optional ADDRESS (click options cannot): a ``batch`` command line's
    bare ``--ray`` (not followed by ``auto``, ``local``, ``scheme://...`` or ``host:port``)
    becomes ``--ray=local``, so a document after it stays a document."""
    if "batch" not in args:
        return args
    out = list(args)
    start = out.index("batch") + 1
    for i in range(start, len(out)):
        if out[i] == "--":
            break
        if out[i] == "--ray" and (i + 1 >= len(out) or not _ADDRESS_RE.match(out[i + 1])):
            out[i] = "--ray=local"
    return out


# ---- display ---------------------------------------------------------------------------------------
class LogView:
    """Plain lines on stderr: the plan, one line per document, status changes."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        runner.on_status = self.status
        self.eta: Eta | None = None
        self.since = time.perf_counter()
        self.tokens = self.tokens_before = self.bytes_done = 0

    def __enter__(self) -> LogView:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def say(self, text: str) -> None:
        err.print(text, highlight=False, soft_wrap=True, markup=False)

    def status(self, text: str) -> None:
        if text == "running":
            self.running()
        else:
            self.say(f"batch: {text}")

    def running(self) -> None:
        """The workers are ready: rates and the ETA count from now (not the model's loading)."""
        self.since = time.perf_counter()
        self.tokens_before = self.tokens
        if self.eta is not None:
            self.eta = Eta(self.eta.totals)
            self.eta.done["bytes"] = self.bytes_done
            self.eta.totals["bytes"] = max(self.bytes_done + 1, self.eta.totals["bytes"])

    def rate(self, progress: Any) -> str:
        self.tokens, self.bytes_done = progress.tokens, progress.bytes_done
        if self.eta is not None:
            self.eta.record("bytes", progress.bytes_done - self.eta.done.get("bytes", 0))
        seconds = time.perf_counter() - self.since
        return f"{(progress.tokens - self.tokens_before) / seconds if seconds > 0 else 0:,.0f} tok/s"

    def plan(self, planned: Any) -> None:
        todo = len(planned.todo) + len(planned.unreadable)
        self.eta = Eta({"bytes": max(1, planned.total_bytes)})
        skipped = f", {len(planned.skipped)} done already" if planned.skipped else ""
        self.say(f"batch: {todo} documents to run{skipped}; {self.runner.label}, {self.runner.workers} worker(s)")

    def line(self, line: dict, progress: Any) -> None:
        rate = self.rate(progress)
        head = f"[{progress.done}/{progress.total}] {line.get('path')}"
        if "error" in line:
            self.say(f"{head}: error: {line['error']}")
        else:
            eta = self.eta.text() if self.eta else ""
            tokens = f"{line.get('context_tokens', 0):,} tokens"
            self.say(f"{head}: {tokens}, {line.get('seconds', 0):.1f} s ({rate}, {eta})")


class _EtaColumn(ProgressColumn):
    def __init__(self, view: LiveView) -> None:
        super().__init__()
        self.view = view

    def render(self, task: Any) -> Text:
        return Text(self.view.eta.text() if self.view.eta is not None else "eta ?")


class LiveView(LogView):
    """The Rich display: documents done of total, tokens/s, failures, elapsed, ETA."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("documents {task.fields[info]}"),
            TimeElapsedColumn(),
            _EtaColumn(self),
            console=err,
        )
        self.task = self.bar.add_task("batch", total=None, info="")

    def __enter__(self) -> LiveView:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def status(self, text: str) -> None:
        if text == "running":
            self.running()
            text = "batch"
        self.bar.update(self.task, description=text)

    def plan(self, planned: Any) -> None:
        super().plan(planned)
        self.bar.update(self.task, total=len(planned.todo) + len(planned.unreadable))
        if planned.skipped:
            self.bar.console.print(f"batch: {len(planned.skipped)} documents done already (skipped)")

    def line(self, line: dict, progress: Any) -> None:
        rate = self.rate(progress)
        if "error" in line:
            self.bar.console.print(f"[red]error:[/] {escape(str(line['error']))}", highlight=False)
        failed = f", {progress.failed} failed" if progress.failed else ""
        self.bar.update(
            self.task,
            completed=progress.done,
            description="batch",
            info=f"{rate}{failed}",
        )
