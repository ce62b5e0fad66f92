"""The loop: chunked prefill with compression after every chunk, then decoding.

Every forward gets explicit logical ``position_ids`` (transformers >= 5.4 drives RoPE from
them alone), so a cache physically shorter than the tokens seen stays correct.  The
engine never touches cache tensors: the cache stores, the method compresses.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..attention import RunState
from ..attention.backends import active_backend, resolve_backend, uses_pod_kernel
from ..attention.stats import Collector, WindowStats
from ..cache import CacheReport, KVCache, SharedKeyLayer
from ..core import defaults
from ..core.budget import FULL, Budget, check_chunk_size
from ..methods.base import Method
from ..methods.pod import PoD
from .models.adapter import Adapter, adapter_for
from .sampler import Sampler
from .scoring import Scoring


@dataclass
class PrefillStats:
    tokens: int = 0
    seconds: float = 0.0
    compress_seconds: float = 0.0
    scoring_seconds: float = 0.0  # scoring passes (reconstruction, questions) after chunks
    chunks: int = 0
    max_cache_bytes: int = 0  # largest physical cache seen at a chunk boundary (before compression)
    max_scoring_cache_bytes: int = 0  # largest cache during a scoring pass (its tokens included)
    trace: list[dict] = field(default_factory=list)  # per chunk: tokens, kv_bytes (for plots)
    report: CacheReport | None = None  # taken right after prefill (before any question)


def cache_keyword(model) -> str:
    """The forward keyword for the cache: ``cache`` where the model takes it (transformers
    5.2x renamed ``past_key_values``, which now warns and goes in 5.40), else the old name."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """Drives one model over one cache with one method and budget."""

    def __init__(
        self,
        model,
        method: Method,
        budget: Budget,
        chunk_size: int = defaults.CHUNK_SIZE,
        obs_window: int = defaults.OBS_WINDOW,
        backend: str = "auto",
        scoring: Scoring | None = None,
    ) -> None:
        check_chunk_size(chunk_size)
        self.model = model
        self.method = method
        if not method.uses_budget:  # structural saving only (plain PoD): no token budget applies
            budget = FULL
        self.scoring = scoring or Scoring()
        self.budget = self.scoring.budget_for(method.budget_for(budget))
        self.chunk_size = chunk_size
        self.device = next(model.parameters()).device
        backend = resolve_backend(backend, self.device.type)  # auto -> this device's backend; errors if it cannot run
        self.cache = KVCache(model.config)
        self.cache_keyword = cache_keyword(model)
        self.obs_window = obs_window
        self.track = method.needs_scores and not budget.is_full  # statistics are recorded only if read
        for layer in self.cache.growing_layers:
            layer.track_scores = self.track
        self.state = RunState(cache=self.cache, count_bias=method.count_bias, backend=backend)
        self.last_logits: torch.Tensor | None = None
        self.stats = PrefillStats()
        method.attach(self.cache, self.state)
        # PoD: the adapter trained by ``kvcli adapt`` for this model and grouping (or none)
        self.adapter: Adapter | None = None
        if isinstance(method, PoD):
            self.adapter = adapter_for(model, method.adapter, method.chosen_blocks)
            method.adapter_used = str(self.adapter.path) if self.adapter is not None else "none"
        for member in self.cache.kv_layers:  # PoD members: keys read in place by the Triton PoD kernel
            if isinstance(member, SharedKeyLayer):
                member.split_keys = uses_pod_kernel(backend)

    # ---- forwards ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, collector: Collector | None = None, keep: int = 1) -> torch.Tensor:
        """Forward ``ids`` (``[1, n]``) at the next logical positions; returns the last
        logits ``[V]`` (``keep`` > 1: the last ``keep`` positions' logits, ``[keep, V]``).
        ``collector`` records attention statistics for scored methods (none by default)."""
        n = ids.shape[-1]
        start = self.cache.seen
        pos = torch.arange(start, start + n, device=self.device)
        self.cache.begin_forward(pos)
        self.state.collector = collector if self.track else None
        adapted = self.adapter.applied(self.model) if self.adapter is not None else contextlib.nullcontext()
        try:
            with adapted:
                out = self.model(
                    input_ids=ids.to(self.device),
                    position_ids=pos.unsqueeze(0),
                    **{self.cache_keyword: self.cache},
                    use_cache=True,
                    logits_to_keep=keep,
                    kvcli_state=self.state,
                )
        finally:
            self.state.collector = None
        self.cache.end_forward(n)
        return out.logits[0, -1] if keep == 1 else out.logits[0, -keep:]

    @torch.inference_mode()
    def forward_chunked(self, ids: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """Forward ``ids`` (``[1, n]``, a suffix such as a question: no scoring, no
        compression) in chunks of ``chunk_size``; returns the logits of its last ``keep``
        positions, ``[keep, V]`` (each chunk keeps only those of them it holds)."""
        n = ids.shape[1]
        parts = []
        for start in range(0, n, self.chunk_size):
            chunk = ids[:, start : start + self.chunk_size]
            want = min(chunk.shape[1], start + chunk.shape[1] - (n - keep))
            logits = self.forward(chunk, keep=max(want, 1))
            if want > 0:
                parts.append(logits.view(-1, logits.shape[-1])[-want:])
        return torch.cat(parts)

    @torch.inference_mode()
    def observe(self, ids: torch.Tensor, collector: Collector) -> None:
        """A scoring pass: forward ``ids`` after the context with ``collector`` recording what
        they attend to, then remove every trace of them from the cache."""
        mark = self.cache.checkpoint()
        # A pass whose scored layers attend over keys they choose need not store its entries
        # there: the cache does not grow by the pass at all (``Clock.detached``).
        self.cache.clock.detached = collector.attends and self.scoring.detached_pass and self.cache.detachable
        try:
            self.forward(ids, collector)
            self.stats.max_scoring_cache_bytes = max(self.stats.max_scoring_cache_bytes, self.cache.nbytes())
        finally:
            self.cache.clock.detached = False
            self.cache.rollback(mark)

    def prefill(self, ids: torch.Tensor, on_chunk: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Stream ``ids`` (``[1, T]``) through the model chunk by chunk, scoring and then
        compressing after each chunk, so the cache never exceeds the budget plus one chunk
        (plus, during a scoring pass, that pass's tokens)."""
        total = ids.shape[-1]
        t0 = time.perf_counter()
        done = 0
        window = WindowStats(self.obs_window) if self.scoring.uses_window else None
        while done < total:
            chunk = ids[:, done : done + self.chunk_size]
            self.last_logits = self.forward(chunk, window)
            start, done = done, done + chunk.shape[-1]
            self.stats.max_cache_bytes = max(self.stats.max_cache_bytes, self.cache.nbytes())
            s0 = time.perf_counter()
            if self.track:
                for pass_ids, collector in self.scoring.passes(ids, start, done):
                    self.observe(pass_ids, collector)
            c0 = time.perf_counter()
            self.stats.scoring_seconds += c0 - s0
            with active_backend(self.state.backend):  # merging kernels follow the attention backend
                self.method.compress(self.cache, self.budget)  # no-op while within budget
            self.stats.compress_seconds += time.perf_counter() - c0
            self.stats.chunks += 1
            self.stats.trace.append({"tokens": self.cache.seen, "kv_bytes": self.cache.nbytes()})
            if on_chunk is not None:
                on_chunk(done, total)
        self.cache.compact()
        self.stats.report = self.cache.report(next(self.model.parameters()).dtype)
        self.stats.tokens += total
        self.stats.seconds += time.perf_counter() - t0
        return self.context_logits()

    def resume(self, last_logits: torch.Tensor, stats: PrefillStats) -> None:
        """Continue from a restored cache (a saved context): decoding starts from
        ``last_logits``, as right after the prefill that ``stats`` describes."""
        self.last_logits = last_logits
        stats.report = self.cache.report(next(self.model.parameters()).dtype)
        self.stats = stats

    def context_logits(self) -> torch.Tensor:
        """Logits after the last prefilled token: where decoding starts."""
        if self.last_logits is None:
            raise RuntimeError("nothing has been prefilled")
        return self.last_logits

    # ---- decoding ------------------------------------------------------------------------
    def generate(
        self,
        first_logits: torch.Tensor,
        max_new_tokens: int,
        sampler: Sampler,
        eos_ids: set[int],
    ) -> Iterator[int]:
        """Yield tokens one at a time (no compression while decoding; appends are in place)."""
        self.cache.reserve(max_new_tokens + 1)
        logits = first_logits
        history: list[int] = []  # what the sampler's repetition guards look at
        for i in range(max_new_tokens):
            token = sampler(logits, history)
            history.append(token)
            yield token
            if token in eos_ids or i == max_new_tokens - 1:
                return
            logits = self.forward(torch.tensor([[token]], device=self.device))
