"""Attention backends behind one signature (see ``attention.attend``).

``sdpa`` is the torch reference and runs everywhere.  ``triton`` (kvcli's kernels) and
``flash`` (flash-attn, optional extra) need CUDA; ``auto`` picks triton on CUDA when it is
installed and sdpa otherwise.  Asking for a backend that cannot run here is a clear error.
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import KvcliError

BACKENDS = ("auto", "sdpa", "flash", "triton")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_backend(name: str, device: str = "auto") -> str:
    if name not in BACKENDS:
        raise KvcliError(f"invalid --attn {name!r}: use one of {', '.join(BACKENDS)}")
    cuda = torch.cuda.is_available() and device != "cpu"
    if name == "auto":
        return "triton" if cuda and _has("triton") else "sdpa"
    if name in ("flash", "triton") and not cuda:
        raise KvcliError(f"--attn {name} needs a CUDA GPU; none is available here (use --attn sdpa or auto)")
    if name == "flash" and not _has("flash_attn"):
        raise KvcliError("--attn flash: flash-attn is not installed (pip install 'kvcli[gpu]')")
    if name == "triton" and not _has("triton"):
        raise KvcliError("--attn triton: triton is not installed (pip install 'kvcli[gpu]')")
    return name


def get_backend(name: str):
    """The attention callable for a resolved backend name."""
    if name == "triton":
        from kvcli_kernels import attention_triton

        return attention_triton
    if name == "flash":
        from .flash import flash_attend

        return flash_attend
    from .attention import attend

    return attend
