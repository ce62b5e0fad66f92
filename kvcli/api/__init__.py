"""kvcli's public Python API: load a model, open a document, prefill it once, ask.

    from kvcli import api
    lm = api.load_model()
    ctx = api.prefill(lm, api.open_document("doc.txt"), method="h2o", budget=0.5)
    print(ctx.ask("Who wrote it?").text)
    print(ctx.report().kv_bytes)

The CLI is a thin layer over this package; tests and benchmarks use it directly.
"""

from ..engine.models import LoadedModel, load_model, wrap_model
from ..engine.sampler import Sampler
from .context import Answer, Context
from .prefilling import DocumentTooLong, open_document, prefill
from .report import PrefillReport

__all__ = [
    "Answer",
    "Context",
    "DocumentTooLong",
    "LoadedModel",
    "PrefillReport",
    "Sampler",
    "load_model",
    "open_document",
    "prefill",
    "wrap_model",
]
