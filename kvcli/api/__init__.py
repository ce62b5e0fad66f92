"""kvcli's public Python API: load a model, open a document, prefill it once, ask.

    from kvcli import api
    lm = api.load_model()
    ctx = api.prefill(lm, api.open_document("doc.txt"), method="h2o", budget=0.5)
    print(ctx.ask("Who wrote it?").text)
    print(ctx.report().kv_bytes)
    ctx.save("doc.kvc")                      # later, in another process:
    ctx = api.load_context(lm, "doc.kvc")    # no prefill; the same answers

The CLI is a thin layer over this package; tests and benchmarks use it directly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.models import LoadedModel, load_model, wrap_model
    from ..engine.sampler import Sampler
    from .context import Answer, Context
    from .prefilling import DocumentTooLong, open_document, prefill, resolve_scoring
    from .reloading import append_document, load_context
    from .report import PrefillReport
    from .saved import SavedContext

#: Where each name lives.  Loaded on first use (PEP 562), so that ``kvcli.api.settings``
#: (presets, option checks) imports without torch: the CLI checks its arguments first.
_WHERE = {
    "LoadedModel": "..engine.models",
    "load_model": "..engine.models",
    "wrap_model": "..engine.models",
    "Sampler": "..engine.sampler",
    "Answer": ".context",
    "Context": ".context",
    "DocumentTooLong": ".prefilling",
    "open_document": ".prefilling",
    "prefill": ".prefilling",
    "resolve_scoring": ".prefilling",
    "PrefillReport": ".report",
    "load_context": ".reloading",
    "append_document": ".reloading",
    "SavedContext": ".saved",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Answer",
    "Context",
    "DocumentTooLong",
    "LoadedModel",
    "PrefillReport",
    "Sampler",
    "SavedContext",
    "append_document",
    "load_context",
    "load_model",
    "open_document",
    "prefill",
    "resolve_scoring",
    "wrap_model",
]
