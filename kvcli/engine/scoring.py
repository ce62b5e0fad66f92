"""Scoring: which passes give scored methods (H2O, SnapKV, CaM, KVMerger, pod+X) their
statistics, after every prefill chunk and before it is compressed.

* ``window``: the last queries of the chunk itself (SnapKV's observation window; no extra
  pass).  Cheap, but the end of a chunk does not predict what a later question will read.
* ``question``: each question, known before prefill, is run after the chunk and rolled
  back; it scores the entries it attends to (query-aware; the context then serves those
  questions).  Several questions: the largest attention any of them paid.
* ``recon``: query-agnostic scoring by context reconstruction (KVzip, Kim et al. 2025),
  adapted to on-the-fly compression: after each chunk, the model is asked to repeat it
  ("Repeat the previous context exactly." for the first chunk; "Repeat the part of the
  previous context exactly, starting with" + the previous chunk's last ``overlap`` tokens
  for the others), the chunk's own tokens are teacher-forced after the prompt (the document's
  only: the prompt template's header before it is not copied, as in KVzip's code), and every
  entry of the chunk gets the largest attention probability any reconstruction query of its
  KV group pays it.  The pass is rolled back.  Its scored layers attend only over the sinks,
  the chunk and the pass itself (``local_pass``, the default), where KVzip's attends over the
  whole cache: the scores are normalised over those same keys either way, and the pass then
  costs one forward of the chunk however long the context before it (measured in
  docs/scoring.md; ``local_pass=False`` is KVzip's whole-cache pass).  Its entries are not
  even stored in the scored layers (``detached_pass``): each layer attends over them
  straight from the forward, so the cache does not grow by the pass.
* ``recon+question``: both; an entry keeps the larger score.

Choosing among them (``auto``) is the API's job: it knows whether the questions are known
before prefill and whether the context is kept for later.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from ..attention.stats import Collector, ProbeStats, ReconStats
from ..core import defaults
from ..core.budget import Budget
from ..core.errors import KvcliError

SCORINGS = defaults.SCORINGS


@dataclass(frozen=True)
class ReconPrompt:
    """Token ids of the reconstruction prompt (see ``Template.reconstruction``)."""

    first: tuple[int, ...]
    next_head: tuple[int, ...]
    next_tail: tuple[int, ...]
    overlap: int = defaults.RECON_OVERLAP
    # The context's leading tokens that are the prompt template's header, not the document
    # (Gemma's ``<bos>``; SmolLM2's system turn and ``<|im_start|>user``): the first chunk's
    # copy starts after them, as KVzip's does (kvpress's KVzipPress skips the chat template's
    # prefix).  Copied, a ``<bos>`` in the middle of the pass lowered the first chunk's scores
    # against the later chunks' (docs/scoring.md).  Not copied, the header is not read by the
    # pass either: its entries get the largest score instead (``ReconStats.header``), as
    # KVzip's sinks do, since every prompt is read through it (left to compete, kvmerger
    # merged SmolLM2's system turn away and lost needles: docs/scoring.md).
    header: int = 0

    def header_in(self, start: int, end: int) -> int:
        """How many of chunk ``start:end``'s tokens belong to the template's header."""
        return max(0, min(self.header, end) - start)

    def ids(self, context: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[1, n]``: the prompt, then tokens ``start:end`` of ``context`` (the chunk), less
        the template's header where the chunk holds it."""
        chunk = context[0, start + self.header_in(start, end) : end].tolist()
        if start == 0:
            return torch.tensor([[*self.first, *chunk]], dtype=torch.long)
        tail = context[0, max(0, start - self.overlap) : start].tolist()
        return torch.tensor([[*self.next_head, *tail, *self.next_tail, *chunk]], dtype=torch.long)


@dataclass
class Scoring:
    """How a run scores entries: ``name`` in ``SCORINGS``, with what that needs."""

    name: str = "window"
    questions: list[list[int]] = field(default_factory=list)  # ids of each question as asked after the document
    recon: ReconPrompt | None = None
    n_sink: int = defaults.N_SINK  # sinks the reconstruction softmax keeps beside the chunk (KVzip: 4)
    local_pass: bool = True  # the reconstruction attends over sinks + chunk + itself, not the whole cache
    # With the local pass, its entries are not stored in the scored layers (attended straight
    # from the forward, ``Clock.detached``): False stores and rolls them back, to compare.
    detached_pass: bool = True

    def __post_init__(self) -> None:
        if self.name not in SCORINGS:
            raise KvcliError(f"scoring {self.name!r} is unknown: use one of {', '.join(SCORINGS)}", option="scoring")
        if "question" in self.name and not self.questions:
            raise KvcliError("question scoring needs the questions before prefill", option="scoring")
        if "recon" in self.name and self.recon is None:
            raise KvcliError("reconstruction scoring needs a reconstruction prompt", option="scoring")

    def budget_for(self, budget: Budget) -> Budget:
        """``budget`` as this scoring runs it.  Question scores alone are shared uniformly
        whatever the allocation says: they are attention the question's queries spread over
        the whole context, whose scale differs from layer to layer, so a ranking across layers
        (``global``, ``heads``) starves the layers whose questions look mostly at the sinks
        (measured on SmolLM2 2K, docs/scoring.md).  Reconstruction scores, alone or with the
        question's, are per-entry maxima and compare across layers."""
        if self.name != "question" or budget.allocation == "uniform":
            return budget
        return replace(budget, allocation="uniform")

    @property
    def uses_window(self) -> bool:
        """Statistics from the chunk's own last queries (no extra pass)."""
        return self.name == "window"

    def passes(self, context: torch.Tensor, start: int, end: int) -> Iterator[tuple[torch.Tensor, Collector]]:
        """The rolled-back forwards to run after chunk ``start:end`` of ``context``, each with
        the collector that records what it observes."""
        if self.recon is not None and "recon" in self.name:
            yield (
                self.recon.ids(context, start, end),
                ReconStats(
                    n_chunk=end - start,
                    n_sink=self.n_sink,
                    attends=self.local_pass,
                    header=self.recon.header_in(start, end),
                ),
            )
        if "question" in self.name:
            for i, q in enumerate(self.questions):
                # After reconstruction the first question must not overwrite obs: keep the larger.
                first = i == 0 and "recon" not in self.name
                yield torch.tensor([q], dtype=torch.long), ProbeStats(length=len(q), first=first)
