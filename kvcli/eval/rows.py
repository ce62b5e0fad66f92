"""What one evaluation produces, shared by the runner (which fills it) and the reports (which read it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

FULL = "full"  # the reference method, always run first

#: Columns of a result row, in CSV order.
COLUMNS = (
    "kind",
    "length",
    "depth",
    "sample",
    "method",
    "budget",
    "scoring",
    "score",
    "logprob",
    "logprob_delta",
    "kv_ratio",
    "prefill_seconds",
    "seed",
    "question",
    "answers",
    "prediction",
)


@dataclass
class EvalRow:
    """One question answered from one (method, budget) context; the fields are ``COLUMNS``."""

    kind: str
    length: int
    depth: float | None
    sample: int
    method: str
    budget: str
    scoring: str | None  # where the method's statistics came from (None: it scores nothing)
    score: float
    logprob: float | None  # mean per-token log-likelihood of the reference answer (None: impossible)
    logprob_delta: float | None  # minus the full cache's
    kv_ratio: float
    prefill_seconds: float | None
    seed: int | None = None
    question: str = ""
    answers: list[str] = field(default_factory=list)
    prediction: str = ""

    @property
    def run(self) -> str:
        """The method as reports name the run: ``snapkv/recon`` for a scored method."""
        return f"{self.method}/{self.scoring}" if self.scoring else self.method

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunSummary:
    """One method@budget over all rows: per-kind mean score, overall (mean over kinds), mean
    log-likelihood delta, % of the full cache's overall, mean kv_ratio, total prefill time."""

    method: str
    budget: str
    label: str
    scores: dict[str, float | None]
    overall: float | None
    logprob_delta: float | None
    pct_of_full: float | None
    kv_ratio: float | None
    prefill_seconds: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    """A whole run: its rows and the settings it ran with (``config``, written with the results)."""

    rows: list[EvalRow]
    config: dict = field(default_factory=dict)
