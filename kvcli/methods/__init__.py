"""Registry of compression methods: one file per method, one line here per method."""

from __future__ import annotations

from ..errors import KvcliError
from .base import Method
from .cam import CaM
from .full import FullCache
from .h2o import H2O
from .kvmerger import KVMerger
from .snapkv import SnapKV
from .streaming import StreamingLLM

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FullCache, StreamingLLM, H2O, SnapKV, CaM, KVMerger)
}


def method_names() -> list[str]:
    return list(REGISTRY)


def make_method(name: str, **options) -> Method:
    """Build a method by name; unknown names and options give a one-line error."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise KvcliError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise KvcliError(f"method {name}: {exc}") from None
