"""kvcli_kernels: reference (torch) and Triton kernels for KV-cache compression.

The Triton implementations live in the submodules ``triton_merge``, ``triton_attention``
and ``triton_pod``; they are *not* imported here, so that importing this package never
imports triton (and so that ``TRITON_INTERPRET`` may still be set before they are loaded).
"""

from __future__ import annotations

import importlib.util
import os

from .reference import adjacent_cosine, attention, merge_sets, pod_attention

__all__ = [
    "adjacent_cosine",
    "merge_sets",
    "attention",
    "pod_attention",
    "TRITON_AVAILABLE",
    "triton_available",
]

# Whether the triton package is installed (checked without importing it).
try:
    TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):  # pragma: no cover
    TRITON_AVAILABLE = False


def _triton_importable() -> bool:
    if not TRITON_AVAILABLE:
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_available() -> bool:
    """True if the Triton kernels can run: triton importable and a GPU or the interpreter."""
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False
