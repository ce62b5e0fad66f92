"""Prefilling: a document (or token ids) streamed through the model into a compressed context."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..core import defaults
from ..core.budget import Budget, parse_budget
from ..core.documents import Document, load_document
from ..core.errors import KvcliError
from ..core.prompts import choose_template
from ..engine.engine import Engine, check_chunk_size
from ..engine.models import LoadedModel
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


def prefill(
    lm: LoadedModel,
    document: Document | str | list[int] | torch.Tensor,
    method: str | Method = defaults.METHOD,
    budget: Budget | float | str = 1.0,
    chunk_size: int = defaults.CHUNK_SIZE,
    question: str | None = None,
    truncate: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    method_options: dict | None = None,
    backend: str = "auto",
    raw: bool = False,
) -> Context:
    """Stream a document through the model into a compressed cache.

    ``method``: a name (with ``method_options``: ``KEY`` / ``METHOD.KEY``, see
    ``kvcli.methods.registry``) or a ``Method`` object, used as it is (it holds this run's
    state afterwards).  ``question``: when given (a single question known before prefill), query-aware methods
    score entries by the attention this question pays them.  ``raw``: the document is
    already token ids; no template is applied (used by tests against ``generate()``).
    """
    if not isinstance(budget, Budget):
        budget = parse_budget(budget)
    check_chunk_size(chunk_size)
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
    if raw:
        ids = torch.as_tensor(document, dtype=torch.long).view(1, -1)
    else:
        text = document.text if isinstance(document, Document) else str(document)
        ids = torch.tensor([template.prefix_ids(tok) + tok.encode(text, add_special_tokens=False)], dtype=torch.long)
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
    engine = Engine(lm.model, meth, budget, chunk_size=chunk_size, backend=backend)
    probe = None
    if question is not None and not raw:
        probe = torch.tensor([tok.encode(template.question(question), add_special_tokens=False)], dtype=torch.long)
    engine.prefill(ids, probe_ids=probe, on_chunk=on_progress)
    return Context(lm=lm, engine=engine, template=template, context_tokens=ids.shape[1], truncated=truncated)
