"""One document in a worker that holds the model: parse its bytes, prefill, answer, report.

A ``Worker`` loads the model once and then runs documents one after another; it never
raises for a document: whatever goes wrong becomes that document's ``error`` (one line),
so a bad document cannot stop a run.  It runs the same in this process, in a local worker
process and in a Ray actor (documents arrive as bytes: the worker needs no access to the
driver's files).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core import defaults
from ..core.budget import Budget, parse_budget
from ..core.documents import parse_document
from ..core.errors import KvcliError
from .spec import BatchSpec, size_text

if TYPE_CHECKING:
    from ..api import Context, LoadedModel


@dataclass(frozen=True)
class DocTask:
    """A document on its way to a worker: its bytes travel with it."""

    index: int  # its place in the run's order
    path: str
    sha256: str
    data: bytes


#: Called with each document's context and its finished line, in the worker (``--save-contexts``
#: plugs in here); it may add keys to the line.
ContextHook = Callable[["Context", DocTask, dict], None]

#: Per-entry metadata a growing layer may hold besides K and V, per KV head: positions (int64)
#: and counts, scores, observation statistics (float32) (``kvcli.cache.sizing``).
_META_BYTES_PER_HEAD = 8 + 4 + 4 + 4


def error_text(exc: BaseException) -> str:
    """An exception as the one line a document's ``error`` holds."""
    if isinstance(exc, KvcliError):
        return " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --budget, --chunk-size or document)"
    msg = " ".join(str(exc).split())[:300]
    return f"internal error: {type(exc).__name__}: {msg} (a bug in kvcli: please report it)"


class SaveContexts:
    """``--save-contexts DIR``: each document's context written as ``DIR/<name>-<sha256[:12]>.kvc``
    (for a later ``kvcli ask``), by the worker, so ``DIR`` must be reachable from the workers
    (on a Ray cluster: a shared filesystem).  The line gets ``context_file`` and
    ``context_file_bytes``; a rerun with other settings replaces the file."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.path.abspath(folder)

    def path_for(self, task: DocTask) -> str:
        stem = os.path.splitext(os.path.basename(task.path))[0] or "document"
        return os.path.join(self.folder, f"{stem}-{task.sha256[:12]}.kvc")

    def __call__(self, ctx: Context, task: DocTask, line: dict) -> None:
        saved = ctx.save(self.path_for(task), force=True)
        line["context_file"] = str(saved.path)
        line["context_file_bytes"] = saved.file_bytes


class Worker:
    """Holds the model; ``run(task)`` is one document's line."""

    def __init__(self, spec: BatchSpec, threads: int | None = None, hook: ContextHook | None = None) -> None:
        import torch

        from .. import api
        from ..attention.backends import resolve_backend

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.hook = hook
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.backend = resolve_backend(spec.attn, spec.device)
        self.lm: LoadedModel = api.load_model(spec.model, device=spec.device, dtype=spec.dtype, quiet=True)
        self.budget = parse_budget(spec.budget)

    # ---- --kv-memory ---------------------------------------------------------------------------
    def memory_plan(self) -> tuple[int, int, int]:
        """``(entries per growing layer that fit --kv-memory, bytes per document token, fixed
        bytes)``: K, V and the metadata a compressed layer may hold, over every growing layer;
        the sliding-window layers' bytes are fixed, whatever the document."""
        from ..cache.sizing import cache_shape, window_layer

        shape = cache_shape(self.lm.model.config, self.lm.dtype)
        growing = len(shape.growing_indices)
        per_token = growing * (shape.kv_entry_bytes + shape.meta_elements * _META_BYTES_PER_HEAD)
        fixed = sum(
            window_layer(shape, i, 1 << 30).bytes for i, kind in enumerate(shape.layer_kinds) if kind != "growing"
        )
        assert self.spec.kv_memory is not None
        entries = (self.spec.kv_memory - fixed) // per_token if per_token else 1 << 62
        return max(0, entries), per_token, fixed

    def _budget(self, text: str, line: dict) -> Budget:
        if self.spec.kv_memory is None:
            return self.budget
        entries, per_token, fixed = self.memory_plan()
        tokens = len(self.lm.tokenizer.encode(text, add_special_tokens=False))
        from ..methods import make_method

        meth = make_method(self.spec.method, **self.spec.options)
        least = getattr(meth, "n_sink", 0) + 1
        line["kv_memory"] = self.spec.kv_memory
        if entries < least and tokens > entries:
            raise KvcliError(
                f"--kv-memory {size_text(self.spec.kv_memory)} holds {entries} entries per layer "
                f"({size_text(per_token)} per token, {size_text(fixed)} fixed); {self.spec.method} needs at least "
                f"{least}, and this document is {tokens} tokens"
            )
        return Budget(tokens=max(1, entries), allocation=self.budget.allocation)

    # ---- one document --------------------------------------------------------------------------
    def run(self, task: DocTask) -> dict:
        t0 = time.perf_counter()
        line: dict[str, Any] = {"kind": "document", "path": task.path, "sha256": task.sha256}
        try:
            line.update(self._run(task, line))
        except Exception as exc:  # one document's failure is its line, never the run's
            line["error"] = error_text(exc)
        line["seconds"] = round(time.perf_counter() - t0, 3)
        line["worker"] = self.name
        return line

    def _run(self, task: DocTask, line: dict) -> dict:
        from .. import api
        from ..api.context import summary_sampler

        spec = self.spec
        doc = parse_document(task.data, task.path)
        budget = self._budget(doc.text, line)
        try:
            ctx = api.prefill(
                self.lm,
                doc,
                method=spec.method,
                budget=budget,
                chunk_size=spec.chunk_size,
                questions=list(spec.questions) or None,
                scoring=spec.scoring,
                truncate=spec.truncate,
                method_options=spec.options,
                backend=self.backend,
            )
        except api.DocumentTooLong as exc:
            raise KvcliError(
                f"document is {exc.tokens} tokens; the model handles {exc.limit} positions ({exc.keep} for the "
                f"document); use --truncate to keep the first {exc.keep} tokens"
            ) from None
        out: dict[str, Any] = {}
        if spec.summarize:
            sampler = summary_sampler(spec.temperature, spec.top_p, spec.seed)
            cap = defaults.SUMMARY_MAX_NEW_TOKENS if spec.max_new_tokens is None else spec.max_new_tokens
            ans = ctx.summarize(max_new_tokens=cap, sampler=sampler)
            out["summary"] = ans.text
        else:
            answers = []
            for q in spec.questions:
                sampler = api.Sampler(temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed)
                cap = defaults.ASK_MAX_NEW_TOKENS if spec.max_new_tokens is None else spec.max_new_tokens
                answers.append({"question": q, "answer": ctx.ask(q, max_new_tokens=cap, sampler=sampler).text})
            out["answers"] = answers
        rep = ctx.report()
        out.update(
            model=rep.model,
            method=rep.method,
            budget=rep.budget,
            budget_ratio=round(min(1.0, budget.target(rep.context_tokens) / rep.context_tokens), 4),
            scoring=rep.scoring,
            context_tokens=rep.context_tokens,
            truncated_tokens=rep.truncated_tokens,
            kv_bytes=rep.kv_bytes,
            kv_bytes_full=rep.kv_bytes_full,
            peak_rss_bytes=rep.peak_rss_bytes,
            prefill_seconds=round(rep.prefill_seconds, 3),
            prefill_tokens_per_second=round(rep.prefill_tokens_per_second, 1),
            decode_seconds=round(rep.decode_seconds, 3),
        )
        if spec.kv_memory is not None:
            out["kv_memory_fits"] = rep.kv_bytes <= spec.kv_memory
        if self.hook is not None:
            line.update(out)
            self.hook(ctx, task, line)
        return out
