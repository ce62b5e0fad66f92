"""Helpers shared by the Triton wrappers (guarded triton import, argument checks)."""

from __future__ import annotations

import os

import torch

try:  # guarded: the package must import without triton
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TRITON_AVAILABLE = False


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(*tensors: torch.Tensor) -> None:
    """Raise unless triton is importable and all tensors sit on one usable device."""
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed; use the kvcli_kernels reference functions")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on the same device, got {sorted(map(str, devices))}")
    dev = next(iter(devices)) if devices else torch.device("cpu")
    if dev.type != "cuda" and not interpret_mode():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got device {dev}); set TRITON_INTERPRET=1 "
            "before importing triton to run them on the CPU interpreter"
        )


def next_pow2(x: int, minimum: int = 1) -> int:
    x = max(int(x), minimum)
    return 1 << (x - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dot (the default would be tf32 on NVIDIA GPUs).
    return "ieee" if dtype == torch.float32 else "tf32"
