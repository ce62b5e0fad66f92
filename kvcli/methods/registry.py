"""Which methods exist, and how options reach them: one line per method below.

Options are ``KEY`` or ``METHOD.KEY`` (``-o`` on every command, preset ``options``):

* a plain ``KEY`` goes to every chosen method that has that option (an error if none has);
* ``METHOD.KEY`` goes to that method only (with several methods, or to one part of a
  composite: ``kvmerger.recent`` reaches pod+kvmerger's inner method);
* in a composite ``pod+X``, a plain ``KEY`` is PoD's when PoD has it, else X's.

Old option names keep working through ``ALIASES`` (per method).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
    for cls in (
        FullCache,
        StreamingLLM,
        H2O,
        SnapKV,
        CaM,
        KVMerger,
        PoD,
    )
}

# PoD composes with a token method that compresses distant entries further.
COMPOSITES = ("pod+kvmerger", "pod+snapkv")

#: Old option names, still accepted: method -> {old name: name}.
ALIASES: dict[str, dict[str, str]] = {
    "pod": {"n_s": "n_sink", "n_r_ratio": "recent", "n_r_min": "recent_min"},
    "h2o": {"recent_ratio": "recent"},
    "cam": {"recent_ratio": "recent"},
}


def method_names() -> list[str]:
    return list(REGISTRY) + list(COMPOSITES)


def describe_methods() -> list[tuple[str, str]]:
    """``(name, description)`` of every method, composites last."""
    out = [(name, cls.description) for name, cls in REGISTRY.items()]
    out += [
        (name, f"PoD, with distant tokens compressed further by {_parts(name)[1]} to the budget") for name in COMPOSITES
    ]
    return out


def _parts(name: str) -> tuple[str, ...]:
    """The registered methods a name is made of: ``("pod", "kvmerger")`` for ``pod+kvmerger``."""
    return tuple(name.split("+")) if name in COMPOSITES else (name,)


def _check_name(name: str) -> None:
    if name not in REGISTRY and name not in COMPOSITES:
        raise KvcliError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")


def canonical(method: str, key: str) -> str:
    """``key``'s current name for registered ``method`` (an old name maps through ``ALIASES``)."""
    return ALIASES.get(method, {}).get(key, key)


def has_option(method: str, key: str) -> bool:
    """Whether ``method`` (a composite: any of its parts) takes option ``key`` (old names too)."""
    _check_name(method)
    return any(canonical(part, key) in REGISTRY[part].option_names() for part in _parts(method))


def _route(name: str, options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``options`` per part of method ``name``, under their current names (one-line errors
    for options no part has, or one given twice)."""
    _check_name(name)
    parts = _parts(name)
    routed: dict[str, dict[str, Any]] = {part: {} for part in parts}
    given: dict[tuple[str, str], str] = {}
    for key, value in options.items():
        scope, _, option = key.rpartition(".")
        if scope and scope not in (name, *parts):
            raise KvcliError(f"{name}: option {key!r} is for method {scope!r}")
        part = scope if scope in parts else next((p for p in parts if has_option(p, option)), parts[0])
        real = canonical(part, option)
        names = REGISTRY[part].option_names()
        if real not in names:
            raise KvcliError(f"{part}: unknown option {option!r} (options: {', '.join(names)})")
        if (part, real) in given:
            raise KvcliError(f"{part}: option {real!r} given twice (as {given[part, real]!r} and {key!r})")
        routed[part][real], given[part, real] = value, key
    return routed


def normalize_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for method ``name`` under their current names (a composite's scoped by
    part), so that two sets of options (a preset's, then ``-o``) can be merged key by key."""
    routed = _route(name, options)
    if len(routed) == 1:
        return routed[name]
    return {f"{part}.{key}": value for part, opts in routed.items() for key, value in opts.items()}


def make_method(name: str, **options: Any) -> Method:
    """A method by name; unknown names and bad options give a one-line ``KvcliError``.
    ``options`` are ``KEY`` or ``METHOD.KEY`` (see the module docstring)."""
    routed = _route(name, options)
    if name in REGISTRY:
        return REGISTRY[name](**routed[name])
    outer, inner = _parts(name)  # a composite is PoD over a token method
    return PoD(**routed[outer], inner=REGISTRY[inner](**routed[inner]))


def split_options(options: Mapping[str, Any], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Options per chosen method: a plain ``KEY`` for every method that has it (an error if
    none has), ``METHOD.KEY`` for that method (or the composites it is a part of)."""
    for m in methods:
        _check_name(m)
    per: dict[str, dict[str, Any]] = {m: {} for m in methods}
    chosen = ", ".join(methods) or "none"
    for key, value in options.items():
        scope, _, option = key.rpartition(".")
        if scope:
            targets = [m for m in methods if scope == m or scope in _parts(m)]
            if not targets:
                raise KvcliError(
                    f"option {key}: method {scope!r} is not among the chosen methods ({chosen})", option="option"
                )
            for m in targets:  # a composite keeps the part's scope, so make_method routes it
                per[m][option if scope == m else key] = value
        else:
            targets = [m for m in methods if has_option(m, option)]
            if not targets:
                raise KvcliError(f"option {key}: none of the chosen methods ({chosen}) has it", option="option")
            for m in targets:
                per[m][option] = value
    return per
