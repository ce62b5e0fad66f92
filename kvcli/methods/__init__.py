"""The methods layer: one file per compression method behind one small interface (``base``),
and the registry that names them and routes their options (``registry``)."""

from .base import Method
from .registry import (
    ALIASES,
    COMPOSITES,
    REGISTRY,
    describe_methods,
    has_option,
    make_method,
    method_names,
    normalize_options,
    split_options,
)

__all__ = [
    "ALIASES",
    "COMPOSITES",
    "REGISTRY",
    "Method",
    "describe_methods",
    "has_option",
    "make_method",
    "method_names",
    "normalize_options",
    "split_options",
]
