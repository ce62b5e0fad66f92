"""Making freed cache memory leave the process, so a smaller cache shows in its peak RSS.

Measured (docs/models.md, "Where the memory went"): with glibc's default malloc, a
compressed cache on SmolLM2 peaked *higher* than the full one.  glibc serves a block
larger than ``M_MMAP_THRESHOLD`` with its own ``mmap`` (returned to the OS on free), and
smaller ones from its heap; but the threshold is dynamic: after the first large block is
freed it rises to that block's size (up to 32 MiB), so the cache's per-layer tensors, which
every chunk reallocates a little larger or smaller, end up in the heap, where the holes
they leave are too small for the next, larger ones and the heap only grows.  Fixing the
threshold (which also stops its adjustment) keeps every large tensor in its own mapping.

``tune_allocator`` is called when a model is loaded; it does nothing off glibc.  Set
``KVCLI_MMAP_THRESHOLD`` (bytes; ``0`` leaves malloc alone) to compare.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 256 * 1024  # chosen by measurement (docs/models.md)
ENV = "KVCLI_MMAP_THRESHOLD"

_done: list[int] = []


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None
    except OSError:
        return None


def tune_allocator() -> int:
    """Fix glibc's mmap threshold (once per process); returns the threshold set, 0 if none."""
    if _done:
        return _done[0]
    try:
        threshold = int(os.environ.get(ENV, MMAP_THRESHOLD))
    except ValueError:
        threshold = MMAP_THRESHOLD
    libc = _libc() if threshold > 0 else None
    ok = libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1
    _done.append(threshold if ok else 0)
    return _done[0]
