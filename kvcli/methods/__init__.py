"""Registry of compression methods: one file per method, one line here per method."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import KvcliError
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


def describe_methods() -> list[tuple[str, str]]:
    """``(name, description)`` of every method, composites last."""
    out = [(name, cls.description) for name, cls in REGISTRY.items()]
    out += [(name, f"PoD, with distant tokens compressed further by {name.split('+', 1)[1]} to the budget")
            for name in COMPOSITES]
    return out


def split_options(options: dict, methods: Sequence[str]) -> dict[str, dict]:
    """Method options per method.  ``method.key`` applies to that method only; a plain
    ``key`` applies to every compressing method of the run (each must accept it)."""
    per: dict[str, dict] = {m: {} for m in methods}
    for key, value in options.items():
        scope, _, name = key.rpartition(".")
        if scope:
            if scope not in per:
                raise KvcliError(f"option {key}: method {scope!r} is not in this run ({', '.join(methods) or 'none'})",
                                 option="option")
            per[scope][name] = value
        else:
            for m in methods:
                per[m].setdefault(key, value)
    return per
