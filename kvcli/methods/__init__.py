"""Registry of compression methods: one file per method, one line here per method."""

from __future__ import annotations

from ..errors import KvcliError
from .base import Method
from .cam import CaM
from .full import FullCache
from .h2o import H2O
from .kvmerger import KVMerger
from .pod import PoD
from .snapkv import SnapKV
from .streaming import StreamingLLM

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (FullCache, StreamingLLM, H2O, SnapKV, CaM, KVMerger, PoD)
}


# PoD composes with a token method that compresses distant entries further.
COMPOSITES = ("pod+kvmerger", "pod+snapkv")
_POD_KEYS = ("n_s", "n_r_ratio", "n_r_min", "block_size", "blocks", "profile")


def method_names() -> list[str]:
    return list(REGISTRY) + list(COMPOSITES)


def make_method(name: str, **options) -> Method:
    """Build a method by name; unknown names and options give a one-line error."""
    if name in COMPOSITES:
        inner_name = name.split("+", 1)[1]
        pod_opts = {k: options.pop(k) for k in list(options) if k in _POD_KEYS}
        return make_method("pod", inner=make_method(inner_name, **options), **pod_opts)
    cls = REGISTRY.get(name)
    if cls is None:
        raise KvcliError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    try:
        return cls(**options)
    except TypeError as exc:
        raise KvcliError(f"method {name}: {exc}") from None
