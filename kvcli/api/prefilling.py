"""Prefilling: a document (or token ids) streamed through the model into a compressed context."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..core import defaults
from ..core.budget import Budget, parse_budget
from ..core.documents import Document, load_document
from ..core.errors import KvcliError
from ..core.prompts import Template, choose_template
from ..engine.engine import Engine, check_chunk_size
from ..engine.models import LoadedModel
from ..engine.scoring import SCORINGS, ReconPrompt, Scoring
from ..methods import Method, make_method
from .context import Context


class DocumentTooLong(KvcliError):
    """The document does not fit the model's positions (``prefill(..., truncate=True)`` keeps its start)."""

    def __init__(self, tokens: int, limit: int, keep: int) -> None:
        self.tokens, self.limit, self.keep = tokens, limit, keep
        super().__init__(
            f"document is {tokens} tokens; the model handles {limit} positions ({keep} for the document after "
            f"reserving {defaults.QUESTION_RESERVE} for the question and answer); pass truncate=True to keep "
            f"the first {keep} tokens",
            option="truncate",
        )


def open_document(path: str) -> Document:
    return load_document(path)


#: What ``scoring="auto"`` picks, by measurement (docs/scoring.md): with the questions
#: known before prefill (the context then serves them only), and without.
AUTO_WITH_QUESTIONS = "recon"  # measured >= question and recon+question (docs/scoring.md)
AUTO_WITHOUT_QUESTIONS = "recon"


def resolve_scoring(scoring: str, has_questions: bool) -> str:
    """The scoring a run uses: ``auto`` becomes what measured best for the case (questions
    known before prefill, or not)."""
    if scoring == "auto":
        return AUTO_WITH_QUESTIONS if has_questions else AUTO_WITHOUT_QUESTIONS
    if scoring not in SCORINGS:
        raise KvcliError(f"scoring {scoring!r} is unknown: use auto or one of {', '.join(SCORINGS)}", option="scoring")
    if "question" in scoring and not has_questions:
        raise KvcliError(f"scoring {scoring} needs the questions before prefill", option="scoring")
    return scoring


def make_scoring(name: str, template: Template, tokenizer, questions: Sequence[str], header: int = 0) -> Scoring:
    """``header``: the context's leading template tokens, which the reconstruction does not copy."""

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    first, next_head, next_tail = template.reconstruction()
    recon = ReconPrompt(tuple(ids(first)), tuple(ids(next_head)), tuple(ids(next_tail)), header=header)
    asked = [ids(template.question(q)) for q in questions] if "question" in name else []
    return Scoring(name=name, questions=asked, recon=recon)


def prefill(
    lm: LoadedModel,
    document: Document | str | list[int] | torch.Tensor,
    method: str | Method = defaults.METHOD,
    budget: Budget | float | str = 1.0,
    chunk_size: int = defaults.CHUNK_SIZE,
    questions: str | Sequence[str] | None = None,
    scoring: str = defaults.SCORING,
    truncate: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    method_options: dict | None = None,
    backend: str = "auto",
    raw: bool = False,
) -> Context:
    """Stream a document through the model into a compressed cache.

    ``method``: a name (with ``method_options``: ``KEY`` / ``METHOD.KEY``, see
    ``kvcli.methods.registry``) or a ``Method`` object, used as it is (it holds this run's
    state afterwards).  ``questions``: the questions, when they are known before prefill and
    the context is for them only (query-aware scoring may use them).  ``scoring``: where
    scored methods get their statistics (``kvcli.engine.scoring``): ``auto`` (default) is
    question scoring when questions are given, else reconstruction.  ``raw``: the document is
    already token ids; no template is applied (used by tests against ``generate()``).
    """
    if not isinstance(budget, Budget):
        budget = parse_budget(budget)
    check_chunk_size(chunk_size)
    asked = [questions] if isinstance(questions, str) else list(questions or [])
    scoring = resolve_scoring(scoring, bool(asked))
    if isinstance(method, Method):
        if method_options:
            raise KvcliError(
                "method_options apply to a method given by name; a Method object holds its own options",
                option="method_options",
            )
        meth = method
    else:
        meth = make_method(method, **(method_options or {}))
    template = choose_template(lm.tokenizer, lm.is_base)
    tok = lm.tokenizer
    header = 0
    if raw:
        ids = torch.as_tensor(document, dtype=torch.long).view(1, -1)
    else:
        text = document.text if isinstance(document, Document) else str(document)
        prefix = template.prefix_ids(tok)
        header = len(prefix)
        ids = torch.tensor([prefix + tok.encode(text, add_special_tokens=False)], dtype=torch.long)
    truncated = 0
    limit = lm.max_positions
    if limit and ids.shape[1] + defaults.QUESTION_RESERVE > limit:
        keep = limit - defaults.QUESTION_RESERVE
        if not truncate:
            raise DocumentTooLong(ids.shape[1], limit, keep)
        truncated = ids.shape[1] - keep
        ids = ids[:, :keep]
    if ids.shape[1] == 0:
        raise KvcliError("document is empty after tokenization")
    plan = make_scoring(scoring, template, tok, asked, header)
    engine = Engine(lm.model, meth, budget, chunk_size=chunk_size, backend=backend, scoring=plan)
    if not bool(torch.isfinite(engine.prefill(ids, on_chunk=on_progress)).all()):  # never an empty answer
        raise KvcliError(
            f"dtype {str(lm.dtype).removeprefix('torch.')}: the model's outputs overflowed (inf/NaN) at this dtype; "
            "use float32 or bfloat16",
            option="dtype",
        )
    source = source_entry(document, ids.shape[1])
    return Context(
        lm=lm,
        engine=engine,
        template=template,
        context_tokens=ids.shape[1],
        truncated=truncated,
        sources=[source],
    )


def source_entry(document: Document | str | list[int] | torch.Tensor, tokens: int) -> dict:
    """What a saved context records of a document: its file name (not the directories) and
    the sha256 of its raw bytes; for text or ids given in Python, their sha256."""
    if isinstance(document, Document):
        name = "stdin" if document.source == "stdin" else Path(document.source).name
        digest = document.sha256 or hashlib.sha256(document.text.encode()).hexdigest()
    elif isinstance(document, str):
        name, digest = "text", hashlib.sha256(document.encode()).hexdigest()
    else:
        ids = torch.as_tensor(document, dtype=torch.long).view(-1).tolist()
        name, digest = "token ids", hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {"name": name, "sha256": digest, "tokens": int(tokens)}
