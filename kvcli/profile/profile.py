"""Measure what each compression method costs on one document: KV bytes, memory, speed.

Each method gets one real prefill of the same document, then greedy decoding of a fixed
number of tokens after a fixed short question (EOS does not stop it, so every method
decodes the same count).  Figures per method (a "row"): KV bytes (counted from the cache
tensors, as ``Context.report``), peak RSS, CUDA peak memory, prefill tokens/s, time to
first token (prefill call to first generated token, the question's forward included) and
decode tokens/s (the tokens after the first, one forward each).

Peak memory, per method, isolated (the default): every method runs in its own child
process (``python -m kvcli.profile``, own session) that loads the model afresh.  In one
process, memory an earlier method freed stays mapped by the allocator and hides part of a
later method's peak, and ``ru_maxrss`` only ever grows.  In the child, once the weights
are loaded, the kernel's high-water mark is reset (``/proc/self/clear_refs`` = 5) and
``VmHWM`` read after decoding: the exact peak of prefill + decode, weights included
(``rss_baseline_bytes`` is the RSS before prefill).  Where that reset is unavailable a
psutil sampling thread (5 ms) measures the peak instead (``rss_method`` says which).
In-process mode (``isolate=False``, ``--no-isolate``; tests) trims the allocator and resets
the mark before each method; faster, less exact.  CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats`` before each method (weights included).

Ctrl-C: the parent forwards SIGINT to the child, which reports what it measured so far;
``run_profile`` returns the rows so far with ``interrupted`` set.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch

from ..api import Context, LoadedModel, load_model, prefill
from ..core import defaults
from ..core.budget import Budget, parse_budget
from ..core.documents import load_document
from ..core.errors import KvcliError
from ..engine.sampler import Sampler
from ..eval.speed import measure_speed
from ..eval.tasks import generate_task
from ..methods import make_method

QUESTION = defaults.PROFILE_QUESTION
DEFAULT_TOKENS = defaults.PROFILE_TOKENS
DEFAULT_DECODE = defaults.PROFILE_DECODE_TOKENS
TASK_KIND, TASK_SEED = "niah_single", 0


# ---- memory ---------------------------------------------------------------------------------
def current_rss() -> int:
    return psutil.Process().memory_info().rss


def _vmhwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def trim_allocator() -> None:
    """Give freed heap memory back to the OS (glibc), so a baseline is not inflated."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak RSS from ``start()`` on: the kernel's VmHWM after a reset, else sampling."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.method = "vmhwm"
        self.baseline = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self.baseline = current_rss()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            if _vmhwm() is None:
                raise OSError
        except OSError:
            self.method = "sampled"
            self._peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss())

    def peak(self) -> int:
        if self.method == "vmhwm":
            return max(_vmhwm() or 0, current_rss())
        self._peak = max(self._peak, current_rss())
        return self._peak

    def stop(self) -> int:
        value = self.peak()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return value


def warm_up(lm) -> None:
    """A 4-token prefill and one decode step before measuring: weights loaded from
    safetensors are memory-mapped and count in RSS only once read, and the first forward
    initialises kernels and thread pools; the first method measured must pay for neither."""
    ctx = prefill(lm, torch.arange(4), method="full", chunk_size=4, raw=True)
    ctx.generate_ids(None, 1)


# ---- one method ---------------------------------------------------------------------------------
@dataclass
class ProfileRow:
    """One method's figures (``None``: not measured, e.g. after Ctrl-C or when it failed)."""

    method: str
    budget: str
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    chunk_size: int | None = None
    status: str = "ok"  # "ok" | "interrupted" | "error"
    rss_baseline_bytes: int | None = None
    rss_method: str | None = None  # "vmhwm" | "sampled"
    method_options: dict | None = None
    tokens: int | None = None
    truncated_tokens: int | None = None
    kv_bytes: int | None = None
    kv_bytes_full: int | None = None
    kv_ratio: float | None = None
    peak_prefill_kv_bytes: int | None = None
    compressed_layers: list[int] | None = None
    kv_bytes_all_layers: list[int] | None = None
    kept_tokens: list[int] | None = None
    prefill_seconds: float | None = None
    prefill_tokens_per_second: float | None = None
    compress_seconds: float | None = None
    trace: list[dict] = field(default_factory=list)  # per chunk: tokens, kv_bytes, rss_bytes, peak_rss_bytes
    ttft_seconds: float | None = None
    decode_tokens: int | None = None
    decode_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    peak_rss_bytes: int | None = None
    cuda_peak_bytes: int | None = None
    error: str | None = None
    document: str | None = None  # where the text came from (``measure_request``)
    isolated: bool | None = None

    def as_dict(self) -> dict:
        """The JSON object of ``kvcli profile --json``: a failed method says only what and why."""
        out = asdict(self)
        if self.status == "error":
            out = {k: out[k] for k in ("method", "budget", "status", "error", "document", "isolated")}
        else:
            del out["error"]
        for key in ("document", "isolated"):
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def failed(cls, method: str, budget: str, error: str) -> ProfileRow:
        return cls(method=method, budget=budget, status="error", error=error)


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during a measurement; ``row`` holds what was measured until then."""

    def __init__(self, row: ProfileRow) -> None:
        super().__init__()
        self.row = row


@dataclass
class Measurement:
    row: ProfileRow
    context: Context | None = None  # in-process only: the cache as after prefill


def _cuda(lm) -> bool:
    return getattr(lm.device, "type", str(lm.device)) == "cuda"


def _decode(ctx, question: str, n: int) -> tuple[float | None, float, int]:
    """Greedy decoding of ``n`` tokens after ``question``; returns (seconds to the first
    token, seconds for the rest, tokens).  The context is restored to its state after
    prefill, spare capacity included, so its tensors are exactly what was reported."""
    engine = ctx.engine
    cache = engine.cache
    if n <= 0:
        return None, 0.0, 0
    ids = ctx.tokenizer.encode(ctx.template.question(question), add_special_tokens=False)
    mark = cache.checkpoint()
    t0 = time.perf_counter()
    first = None
    count = 0
    try:
        logits = engine.context_logits()
        if ids:
            logits = engine.forward_chunked(torch.tensor([ids], dtype=torch.long))[-1]
        for _ in engine.generate(logits, n, Sampler(), eos_ids=set()):
            count += 1
            if first is None:
                first = time.perf_counter() - t0
    finally:
        cache.rollback(mark)
        cache.compact()
    return first, time.perf_counter() - t0 - (first or 0.0), count


def measure(
    lm: LoadedModel,
    document: Any,
    method: str,
    budget: str | Budget,
    chunk_size: int = defaults.CHUNK_SIZE,
    method_options: dict | None = None,
    decode_tokens: int = DEFAULT_DECODE,
    question: str = QUESTION,
    backend: str = "sdpa",
    raw: bool = False,
    truncate: bool = True,
    on_chunk: Callable[[int, int], None] | None = None,
    keep_context: bool = False,
) -> Measurement:
    """Prefill ``document`` once with ``method`` and decode; one row of figures.

    Ctrl-C raises ``ProfileInterrupted`` carrying the figures measured so far.
    """
    budget = budget if isinstance(budget, Budget) else parse_budget(budget)
    cuda = _cuda(lm)
    if cuda:
        torch.cuda.synchronize(lm.device)
        torch.cuda.reset_peak_memory_stats(lm.device)
    mem = PeakMemory().start()
    meth = make_method(method, **(method_options or {}))
    shown = str(budget) if meth.compresses and meth.uses_budget else "1"  # full and plain pod keep every token
    row = ProfileRow(
        method=method,
        budget=shown,
        model=lm.name,
        device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."),
        chunk_size=chunk_size,
        rss_baseline_bytes=mem.baseline,
        rss_method=mem.method,
    )
    trace_mem: list[dict] = []
    t_start = time.perf_counter()
    state = {"done": 0}

    def cb(done: int, total: int) -> None:
        state["done"] = done
        sample = {"tokens": done, "rss_bytes": current_rss(), "peak_rss_bytes": mem.peak()}
        if cuda:
            sample["cuda_bytes"] = torch.cuda.memory_allocated(lm.device)
        trace_mem.append(sample)
        if on_chunk is not None:
            on_chunk(done, total)

    def finish_memory() -> None:
        row.peak_rss_bytes = mem.stop()
        row.cuda_peak_bytes = torch.cuda.max_memory_allocated(lm.device) if cuda else None

    try:
        ctx = prefill(
            lm,
            document,
            method=meth,
            budget=budget,
            chunk_size=chunk_size,
            truncate=truncate,
            backend=backend,
            raw=raw,
            on_progress=cb,
        )
        rep = ctx.report()
        stats = ctx.engine.stats
        row.method_options, row.tokens, row.truncated_tokens = (
            rep.method_options,
            rep.context_tokens,
            rep.truncated_tokens,
        )
        row.kv_bytes, row.kv_bytes_full, row.kv_ratio = rep.kv_bytes, rep.kv_bytes_full, rep.kv_ratio
        row.peak_prefill_kv_bytes = stats.max_cache_bytes
        row.compressed_layers, row.kv_bytes_all_layers = rep.compressed_layers, rep.kv_bytes_all_layers
        row.kept_tokens, row.prefill_seconds = rep.kept_tokens, rep.prefill_seconds
        row.prefill_tokens_per_second, row.compress_seconds = rep.prefill_tokens_per_second, rep.compress_seconds
        row.trace = [{**m, **t} for t, m in zip(stats.trace, trace_mem, strict=True)]
        t_prefilled = time.perf_counter()
        first, rest, count = _decode(ctx, question, decode_tokens)
        row.ttft_seconds = None if first is None else (t_prefilled - t_start) + first
        row.decode_tokens, row.decode_seconds = count, rest
        row.decode_tokens_per_second = (count - 1) / rest if count > 1 and rest > 0 else None
        finish_memory()
    except KeyboardInterrupt:
        finish_memory()
        row.status = "interrupted"
        if row.prefill_seconds is None:  # stopped inside prefill: no KV bytes, the cache is half-built
            row.tokens = state["done"]
            row.prefill_seconds = time.perf_counter() - t_start
            row.prefill_tokens_per_second = state["done"] / row.prefill_seconds if state["done"] else None
            row.trace = trace_mem
        raise ProfileInterrupted(row) from None
    return Measurement(row=row, context=ctx if keep_context else None)


# ---- a whole profile ------------------------------------------------------------------------------
@dataclass
class ProfileSpec:
    """What to profile.  ``document`` is text (or token ids with ``raw``)."""

    document: Any
    methods: list[str]
    budget: str = defaults.PROFILE_BUDGET
    chunk_size: int = defaults.CHUNK_SIZE
    options: dict[str, dict] = field(default_factory=dict)  # per method
    decode_tokens: int = DEFAULT_DECODE
    model: str = defaults.MODEL
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "sdpa"
    question: str = QUESTION
    raw: bool = False
    source: str | None = None  # where ``document`` came from, reported in each row
    calibrate: bool = True  # time one chunk and a few decode steps first (the "loaded" event's data)


@dataclass
class ProfileResult:
    rows: list[ProfileRow]
    interrupted: bool = False


# on_event(event, method, data): "start"; "loaded" (data: None, or for the first method with
# ``calibrate`` the measured seconds per prefill token, per decoded token, and per prefill
# token of the first scored method, or None); "chunk" (data = (done, total)); "done" (data = row).
EventFn = Callable[[str, str, Any], None]


def _ignore(event: str, method: str, data: Any) -> None:
    return None


def scored_methods(spec: ProfileSpec) -> list[str]:
    """The methods of ``spec`` that score entries at its budget: their scoring passes make
    their prefill slower than the full cache's."""
    budget = parse_budget(spec.budget)
    out = []
    for m in spec.methods:
        meth = make_method(m, **(spec.options.get(m) or {}))
        if meth.needs_scores and meth.uses_budget and not budget.is_full:
            out.append(m)
    return out


def _speed(lm: LoadedModel, spec: ProfileSpec, document: Any) -> list[float | None]:
    scored = scored_methods(spec)
    sp = measure_speed(lm, document, spec.chunk_size, raw=spec.raw, scored=scored[0] if scored else None)
    return [sp.prefill, sp.decode, sp.scored]


def run_profile(
    spec: ProfileSpec, lm: LoadedModel | None = None, isolate: bool = True, on_event: EventFn | None = None
) -> ProfileResult:
    """Every method of ``spec`` in turn: isolated child processes, or in-process with ``lm``."""
    emit = on_event or _ignore
    rows: list[ProfileRow] = []
    speed = None
    if not isolate and lm is not None:
        if spec.calibrate:
            speed = tuple(_speed(lm, spec, spec.document))
        else:
            warm_up(lm)
    for k, method in enumerate(spec.methods):
        emit("start", method, None)
        try:
            if isolate:
                row = _run_child(spec, method, emit, calibrate=spec.calibrate and k == 0)
            else:
                if lm is None:
                    raise ValueError("in-process profiling needs a loaded model")
                trim_allocator()
                emit("loaded", method, speed if k == 0 else None)
                row = _in_process(spec, method, lm, emit)
        except ProfileInterrupted as exc:
            exc.row.document, exc.row.isolated = spec.source, isolate
            rows.append(exc.row)
            return ProfileResult(rows, interrupted=True)
        except KeyboardInterrupt:
            return ProfileResult(rows, interrupted=True)
        row.document, row.isolated = spec.source, isolate
        rows.append(row)
        emit("done", method, row)
    if rows and all(r.status == "error" for r in rows):
        raise KvcliError(rows[0].error or "every method failed")
    return ProfileResult(rows)


def _in_process(spec: ProfileSpec, method: str, lm: LoadedModel, emit: EventFn) -> ProfileRow:
    try:
        m = measure(
            lm,
            spec.document,
            method,
            spec.budget,
            spec.chunk_size,
            spec.options.get(method),
            spec.decode_tokens,
            spec.question,
            spec.backend,
            raw=spec.raw,
            on_chunk=lambda d, t: emit("chunk", method, (d, t)),
        )
    except KvcliError as exc:
        return ProfileRow.failed(method, spec.budget, str(exc))
    return m.row


def _child_spec(spec: ProfileSpec, method: str, calibrate: bool = False) -> dict:
    doc = list(map(int, spec.document)) if spec.raw else spec.document
    return {
        "calibrate": calibrate,
        "methods": spec.methods,  # the calibration times a chunk of the first scored one
        "all_options": spec.options,
        "model": spec.model,
        "device": spec.device,
        "dtype": spec.dtype,
        "document": doc,
        "raw": spec.raw,
        "method": method,
        "budget": spec.budget,
        "chunk_size": spec.chunk_size,
        "options": spec.options.get(method) or {},
        "decode_tokens": spec.decode_tokens,
        "question": spec.question,
        "backend": spec.backend,
    }


def _run_child(spec: ProfileSpec, method: str, emit: EventFn, calibrate: bool = False) -> ProfileRow:
    with tempfile.TemporaryFile(mode="w+", prefix="kvcli-profile-") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvcli.profile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errf,
            start_new_session=True,
            text=True,
        )
        result: dict | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None  # both are pipes
            proc.stdin.write(json.dumps(_child_spec(spec, method, calibrate)))
            proc.stdin.close()
            for line in proc.stdout:
                msg = json.loads(line)
                kind = msg["event"]
                if kind in ("row", "interrupted", "error"):
                    result = msg
                else:
                    emit(kind, method, tuple(msg["data"]) if msg.get("data") is not None else None)
            proc.wait()
        except KeyboardInterrupt:
            result = _interrupt_child(proc)
            got = (result or {}).get("row")
            row = ProfileRow(**got) if got else ProfileRow(method=method, budget=spec.budget)
            row.status = "interrupted"
            raise ProfileInterrupted(row) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result is None or result["event"] == "interrupted":
            errf.seek(0)
            tail = [line for line in errf.read().strip().splitlines() if line.strip()]
            why = tail[-1][:300] if tail else f"exit status {proc.returncode}"
            return ProfileRow.failed(method, spec.budget, f"{method}: child process failed ({why})")
        if result["event"] == "error":
            return ProfileRow.failed(method, spec.budget, result["message"])
        return ProfileRow(**result["row"])


def _interrupt_child(proc: subprocess.Popen[str]) -> dict | None:
    """Ask the child (own session, so Ctrl-C did not reach it) to stop and report."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    timer = threading.Timer(15, proc.kill)  # a child stuck in one long operation
    timer.start()
    result = None
    try:
        for line in proc.stdout or ():
            msg = json.loads(line)
            if msg["event"] in ("row", "interrupted"):
                result = msg
                break
    except (KeyboardInterrupt, ValueError, OSError):
        pass
    finally:
        timer.cancel()
    return result


def child_main() -> None:
    """Child side: read one spec (JSON) on stdin, report events as JSON lines on stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    sys.stdout = sys.stderr

    def send(event: str, **data) -> None:
        proto.write(json.dumps({"event": event, **data}) + "\n")
        proto.flush()

    try:
        spec = json.loads(sys.stdin.read())
        lm = load_model(spec["model"], device=spec["device"], dtype=spec["dtype"], quiet=True)
        speed = None
        if spec.get("calibrate"):  # warms up too
            whole = ProfileSpec(
                document=None,
                methods=spec["methods"],
                budget=spec["budget"],
                chunk_size=spec["chunk_size"],
                options=spec["all_options"],
                raw=spec["raw"],
            )
            speed = _speed(lm, whole, spec["document"])
        else:
            warm_up(lm)
        trim_allocator()
        send("loaded", data=speed)
        m = measure(
            lm,
            spec["document"],
            spec["method"],
            spec["budget"],
            spec["chunk_size"],
            spec["options"],
            spec["decode_tokens"],
            spec["question"],
            spec["backend"],
            raw=spec["raw"],
            on_chunk=lambda d, t: send("chunk", data=[d, t]),
        )
        send("row", row=m.row.as_dict())
    except ProfileInterrupted as exc:
        send("row", row=exc.row.as_dict())
    except KeyboardInterrupt:
        send("interrupted")
    except KvcliError as exc:
        send("error", message=str(exc))
    except Exception as exc:  # reported as one line by the parent
        send(
            "error",
            message=f"{spec.get('method', '?') if 'spec' in locals() else '?'}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
        )


# ---- documents ---------------------------------------------------------------------------------------
def default_document(tokenizer, tokens: int = DEFAULT_TOKENS) -> str:
    """A generated haystack of ``tokens`` tokens (a RULER-style needle task's context)."""
    return generate_task(TASK_KIND, tokenizer, int(tokens), TASK_SEED).context


def first_tokens(tokenizer, text: str, tokens: int) -> str:
    """The text of the first ``tokens`` tokens of ``text``."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens])


def profile_text(tokenizer, path: str | None = None, tokens: int | None = None) -> tuple[str, str]:
    """``(text, source)`` to profile on: the document at ``path`` (its first ``tokens``
    tokens when given), else a generated haystack of ``tokens`` (default ``PROFILE_TOKENS``)."""
    if path is not None:
        text = load_document(path).text
        return (text if tokens is None else first_tokens(tokenizer, text, tokens)), path
    n = tokens or DEFAULT_TOKENS
    return default_document(tokenizer, n), f"generated haystack ({n} tokens)"
