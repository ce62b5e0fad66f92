"""A batch run: plan (what is done already), dispatch to a runner, write each line, summarize.

The driver alone reads documents and writes the results file; workers get bytes and send
lines back.  A document is skipped when the results file already has a successful line
with the same content (sha256) and the same settings key; a failed one runs again.  A
document whose content appeared earlier in the same run is skipped too (one line per
content and settings).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from ..core.documents import read_document_bytes
from ..core.errors import KvcliError
from .results import ResultsWriter, done_keys
from .runners import Runner
from .spec import BatchSpec
from .work import DocTask, error_text


@dataclass
class Planned:
    """The run's documents after looking at the results file."""

    todo: list[tuple[int, str, str, int]] = field(default_factory=list)  # (index, path, sha256, bytes)
    skipped: list[str] = field(default_factory=list)  # done already (or the same content earlier in this run)
    unreadable: list[tuple[int, str, str]] = field(default_factory=list)  # (index, path, error)

    @property
    def total_bytes(self) -> int:
        return sum(t[3] for t in self.todo)


@dataclass
class BatchSummary:
    kind: str
    documents: int
    done: int
    failed: int
    skipped: int
    context_tokens: int
    seconds: float
    tokens_per_second: float
    documents_per_hour: float
    runner: str
    workers: int
    settings: str

    def as_dict(self) -> dict:
        return asdict(self)


def plan(paths: list[str], spec: BatchSpec, previous: list[dict], contexts: bool = False) -> Planned:
    """Read every document once (its sha256) and sort it: to do, done already, unreadable.
    ``contexts``: a document counts as done only with its saved context still on disk."""
    done = done_keys(previous, contexts)
    key = spec.key()
    out = Planned()
    seen: set[str] = set()
    for index, path in enumerate(paths):
        try:
            data = read_document_bytes(path)
        except KvcliError as exc:
            out.unreadable.append((index, path, error_text(exc)))
            continue
        sha = hashlib.sha256(data).hexdigest()
        if (sha, key) in done or sha in seen:
            out.skipped.append(path)
        else:
            out.todo.append((index, path, sha, len(data)))
        seen.add(sha)
    return out


@dataclass
class Progress:
    """What the display needs after each document."""

    total: int  # documents to run in this invocation
    done: int = 0
    failed: int = 0
    tokens: int = 0
    bytes_done: int = 0
    total_bytes: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


def run_batch(
    paths: list[str],
    spec: BatchSpec,
    runner: Runner,
    writer: ResultsWriter,
    on_line: Callable[[dict, Progress], None] | None = None,
    on_plan: Callable[[Planned], None] | None = None,
) -> BatchSummary:
    """Run ``spec`` over ``paths`` on ``runner``, appending a line per document (and a
    summary line) through ``writer`` (already open).  ``on_line``: called after each line
    is on disk."""
    key = spec.key()
    planned = plan(paths, spec, writer.previous, contexts=runner.hook is not None)
    if on_plan is not None:
        on_plan(planned)
    progress = Progress(total=len(planned.todo) + len(planned.unreadable), total_bytes=planned.total_bytes)
    sizes = {t[1]: t[3] for t in planned.todo}

    def record(line: dict) -> None:
        line.setdefault("settings", key)
        line.setdefault("model", spec.model)
        line.setdefault("method", spec.method)
        line.setdefault("budget", spec.budget)
        writer.write(line)
        progress.done += 1
        progress.failed += "error" in line
        progress.tokens += int(line.get("context_tokens") or 0)
        progress.bytes_done += sizes.get(str(line.get("path")), 0)
        if on_line is not None:
            on_line(line, progress)

    for _, path, why in planned.unreadable:
        record({"kind": "document", "path": path, "sha256": None, "settings": key, "error": why})

    def tasks() -> Iterator[DocTask]:
        for index, path, sha, _ in planned.todo:
            try:
                data = read_document_bytes(path)
            except KvcliError as exc:  # gone or changed since it was planned
                record({"kind": "document", "path": path, "sha256": sha, "error": error_text(exc)})
                continue
            yield DocTask(index=index, path=path, sha256=hashlib.sha256(data).hexdigest(), data=data)

    if planned.todo:
        for line in runner.run(tasks()):
            record(line)
    seconds = progress.elapsed
    summary = BatchSummary(
        kind="summary",
        documents=len(paths),
        done=progress.done - progress.failed,
        failed=progress.failed,
        skipped=len(planned.skipped),
        context_tokens=progress.tokens,
        seconds=round(seconds, 3),
        tokens_per_second=round(progress.tokens / seconds, 1) if seconds > 0 else 0.0,
        documents_per_hour=round(3600 * (progress.done - progress.failed) / seconds, 1) if seconds > 0 else 0.0,
        runner=runner.label,
        workers=runner.workers,
        settings=key,
    )
    writer.write(summary.as_dict())
    return summary
