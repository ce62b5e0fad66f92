"""A prefilled document: ask questions, summarize, score answers, report what it holds."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..core import defaults
from ..core.prompts import Template
from ..engine.engine import Engine
from ..engine.models import LoadedModel
from ..engine.sampler import Sampler
from .report import PrefillReport

if TYPE_CHECKING:
    from .saved import SavedContext


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class Answer:
    question: str
    text: str
    tokens: list[int]
    seconds: float
    capped: bool = False  # the max_new_tokens cap cut it off (no end of text, no stop string)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Context:
    """A document prefilled into a (compressed) cache; answers several questions."""

    lm: LoadedModel
    engine: Engine
    template: Template
    context_tokens: int
    truncated: int = 0
    answers: list[Answer] = field(default_factory=list)
    decode_seconds: float = 0.0
    sources: list[dict] = field(default_factory=list)  # {name, sha256, tokens}: what was prefilled, in order

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)

    def _eos(self) -> set[int]:
        eos = self.lm.model.generation_config.eos_token_id if self.lm.model.generation_config else None
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def generate_ids(
        self,
        suffix_ids: list[int] | torch.Tensor | None,
        max_new_tokens: int,
        sampler: Sampler | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> list[int]:
        """Append ``suffix_ids`` after the context, decode, then restore the context.

        ``on_token`` may return True to stop (stop strings).  EOS is not included.
        """
        mark = self.engine.cache.checkpoint()
        sampler = sampler or Sampler()
        out: list[int] = []
        try:
            logits = self.engine.context_logits()
            ids = torch.as_tensor([] if suffix_ids is None else suffix_ids, dtype=torch.long).view(1, -1)
            if ids.numel():
                logits = self.engine.forward_chunked(ids)[-1]
            eos = self._eos()
            for token in self.engine.generate(logits, max_new_tokens, sampler, eos):
                if token in eos:
                    break
                out.append(token)
                if on_token is not None and on_token(token):
                    break
        finally:
            self.engine.cache.rollback(mark)
        return out

    def _complete(
        self, suffix: str, stops: list[str], max_new_tokens: int, sampler, on_text
    ) -> tuple[str, list[int], float, bool]:
        t0 = time.perf_counter()
        shown = ""
        tokens: list[int] = []
        state = {"text": ""}
        stopped = [False]

        def step(token: int) -> bool:
            nonlocal shown
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _first_stop(text.lstrip(), stops)
            if cut is not None:
                text = text.lstrip()[:cut]
            state["text"] = text
            visible = text.lstrip()
            if on_text is not None and len(visible) > len(shown) and not text.endswith("\ufffd"):
                on_text(visible[len(shown) :])
                shown = visible
            stopped[0] = cut is not None
            return cut is not None

        self.generate_ids(self._ids(suffix)[0], max_new_tokens, sampler, step)
        seconds = time.perf_counter() - t0
        self.decode_seconds += seconds
        final = state["text"].strip()
        if on_text is not None and len(final) > len(shown) and final.startswith(shown):
            on_text(final[len(shown) :])
        return final, tokens, seconds, len(tokens) >= max_new_tokens and not stopped[0]

    def ask(
        self,
        question: str,
        max_new_tokens: int = defaults.ASK_MAX_NEW_TOKENS,
        sampler: Sampler | None = None,
        on_text: Callable[[str], None] | None = None,
        answer_prefix: str = "",
    ) -> Answer:
        """Answer one question from the context (the context is left as it was)."""
        text, tokens, secs, capped = self._complete(
            self.template.question(question, answer_prefix), self.template.stop_answer, max_new_tokens, sampler, on_text
        )
        ans = Answer(question=question, text=text, tokens=tokens, seconds=secs, capped=capped)
        self.answers.append(ans)
        return ans

    def summarize(
        self,
        max_new_tokens: int = defaults.SUMMARY_MAX_NEW_TOKENS,
        sampler: Sampler | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """A summary of the context.  Without a ``sampler``: greedy with the repetition
        guards measured for small base models (``summary_sampler``)."""
        text, tokens, secs, capped = self._complete(
            self.template.summary_suffix,
            self.template.stop_summary,
            max_new_tokens,
            sampler or summary_sampler(),
            on_text,
        )
        return Answer(question="summary", text=text, tokens=tokens, seconds=secs, capped=capped)

    @torch.inference_mode()
    def answer_logprob(self, question: str, answer: str, answer_prefix: str = "") -> float:
        """Mean log-likelihood per token of ``answer`` after the question (teacher forcing).

        One forward of the question and the answer (chunked like any suffix) over the
        context, keeping the logits of the positions that predict the answer's tokens."""
        prompt = self._ids(self.template.question(question, answer_prefix))[0]
        target = self._ids(" " + answer.strip())[0]
        if not target.numel():
            return 0.0
        ids = torch.cat([prompt, target[:-1]]).view(1, -1)  # the prompt is never empty
        mark = self.engine.cache.checkpoint()
        try:
            logits = self.engine.forward_chunked(ids, keep=target.numel())  # those predicting the answer
        finally:
            self.engine.cache.rollback(mark)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return float(logp.gather(-1, target.view(-1, 1).to(logp.device)).sum()) / target.numel()

    def save(self, path: str | os.PathLike, force: bool = False) -> SavedContext:
        """Write the context to a ``.kvc`` file (``kvcli.api.saved``): ``api.load_context``
        reads it back, for answers token-identical to this context's.  An existing file is
        replaced only with ``force``; the write is atomic."""
        from .saved import save_context

        return save_context(self, path, force=force)

    def report(self) -> PrefillReport:
        """Measured figures for ``--json`` and benchmarks (bytes counted from tensors)."""
        stats = self.engine.stats
        rep = stats.report or self.engine.cache.report(self.lm.dtype)
        return PrefillReport(
            model=self.lm.name,
            method=self.engine.method.label,
            method_options=self.engine.method.options(),
            budget=str(self.engine.budget),
            scoring=self.engine.scoring.name if self.engine.track else None,
            context_tokens=self.context_tokens,
            truncated_tokens=self.truncated,
            kv_bytes=rep.kv_bytes,
            kv_bytes_full=rep.kv_bytes_full,
            kv_ratio=rep.kv_bytes / rep.kv_bytes_full if rep.kv_bytes_full else 1.0,
            compressed_layers=rep.compressed_layers,
            kv_bytes_per_layer=[rep.per_layer[i] for i in rep.compressed_layers],
            kv_bytes_all_layers=rep.per_layer,
            kept_tokens=rep.kept_tokens,
            peak_rss_bytes=peak_rss_bytes(),
            peak_prefill_kv_bytes=stats.max_cache_bytes,
            peak_scoring_kv_bytes=stats.max_scoring_cache_bytes,
            prefill_seconds=stats.seconds,
            prefill_tokens_per_second=stats.tokens / stats.seconds if stats.seconds else 0.0,
            compress_seconds=stats.compress_seconds,
            scoring_seconds=stats.scoring_seconds,
            decode_seconds=self.decode_seconds,
            chunk_size=self.engine.chunk_size,
            adapter=str(self.engine.adapter.path) if self.engine.adapter is not None else "none",
        )


def summary_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Sampler:
    """The sampler a summary uses by default: the repetition guards in ``kvcli.core.defaults``
    (the grid is measured by benchmarks/summary_repetition.py; answers keep plain decoding)."""
    return Sampler(
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repetition_penalty=defaults.SUMMARY_REPETITION_PENALTY,
        no_repeat_ngram=defaults.SUMMARY_NO_REPEAT_NGRAM,
    )


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and text.find(s) > 0]
    return min(hits) if hits else None
