"""Attention backends behind one signature (see ``reference.attend``), and which runs where.

``backend`` (the CLI's ``--attn``):

* ``sdpa``: the torch reference (``reference.attend``, torch's SDPA with kvcli's position
  mask and count bias).  Runs everywhere; on CPU it is what ``auto`` picks, so CPU results
  do not depend on what is installed.
* ``triton``: kvcli's Triton kernels (``kvcli_kernels``): attention over the compressed
  cache with the count bias, PoD member layers reading the anchor's distant keys in place
  (no concatenation), and KVMerger's similarity and merge.  Needs CUDA and triton; on a
  CPU it is allowed only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, for
  tests).
* ``flash``: flash-attn for the calls it computes exactly (``flash.flash_plan``: no count
  bias, a causal layout it can express); each other call falls back to the Triton kernel
  where triton can run, else to ``sdpa``.  Needs CUDA (Ampere+) and flash-attn.
* ``auto``: on CUDA, ``flash`` when flash-attn can run, else ``triton`` when triton is
  importable, else ``sdpa``; on CPU, ``sdpa``.

Asking explicitly for a backend that cannot run here is a ``KvcliError`` (one line).
Merging (KVMerger, also inside pod+kvmerger) follows the run's backend: the Triton merge
kernels under ``triton``/``flash`` when triton can run on the tensors' device, the torch
reference otherwise (``merge_sets``/``adjacent_similarity`` below).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import kvcli_kernels

from ..core.errors import KvcliError
from . import flash
from .reference import attend

BACKENDS = ("auto", "sdpa", "flash", "triton")
KERNEL_BACKENDS = ("triton", "flash")  # runs whose compression uses the Triton kernels


# ---- what this machine can run (each check is monkeypatchable in tests) ------------------------


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401  # optional: probed, never required
    except Exception:
        return False
    return True


def flash_unavailable_reason() -> str | None:
    """None when flash-attn can run here, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install 'kvcli[gpu]')"
    return flash.flash_unavailable_reason()


def kernels_usable(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    dev = torch.device(device)
    return triton_importable() and (dev.type == "cuda" or interpret_mode())


# ---- backend request -> backend name -----------------------------------------------------------


def resolve_backend(name: str, device: str = "auto") -> str:
    """The backend for the request ``name`` on ``device`` (auto|cpu|cuda), or a one-line
    ``KvcliError`` (``option="backend"``) when it cannot run here."""
    if name not in BACKENDS:
        raise KvcliError(f"backend {name!r} is unknown: use one of {', '.join(BACKENDS)}", option="backend")
    cuda = device in ("auto", "cuda") and cuda_available()
    if name == "sdpa":
        return "sdpa"
    if name == "auto":
        if not cuda:
            return "sdpa"
        if flash_unavailable_reason() is None:
            return "flash"
        return "triton" if triton_importable() else "sdpa"
    if name == "triton":
        if not triton_importable():
            raise KvcliError(
                "backend triton: triton is not installed (pip install 'kvcli[gpu]'); use sdpa or auto", option="backend"
            )
        if not cuda and not interpret_mode():
            raise KvcliError(
                f"backend triton needs a CUDA GPU and {_no_gpu(device)} (use sdpa or auto; "
                "TRITON_INTERPRET=1 runs the kernels on the CPU interpreter, for tests)",
                option="backend",
            )
        return "triton"
    # flash
    if not cuda:
        raise KvcliError(f"backend flash needs a CUDA GPU and {_no_gpu(device)} (use sdpa or auto)", option="backend")
    why = flash_unavailable_reason()
    if why is not None:
        raise KvcliError(f"backend flash: {why} (use triton, sdpa or auto)", option="backend")
    return "flash"


def _no_gpu(device: str) -> str:
    return "the device is cpu" if device == "cpu" else "no CUDA GPU is available here"


def uses_pod_kernel(backend: str) -> bool:
    """PoD member layers attend through the Triton PoD kernel, distant keys read in place
    from the anchor, instead of having their keys assembled by concatenation."""
    return backend == "triton"


# ---- backend name -> attention callable (``reference.attend``'s signature) ---------------------


def triton_attend(query, key, value, q_pos, k_pos, bias, scaling, window):
    """``reference.attend`` on the Triton kernel: kvcli's shapes to the kernel's
    (``q_pos`` ``[Lq]`` -> ``[B, Lq]``; ``k_pos`` ``[B, 1|H, Lk]`` -> ``[B, Hkv, Lk]``; views)."""
    from kvcli_kernels.triton_attention import attention_triton  # imports triton: only when it runs

    b, hkv = key.shape[0], key.shape[1]
    qp = q_pos.reshape(1, -1).expand(b, -1) if q_pos.dim() == 1 else q_pos
    kp = k_pos.expand(b, hkv, k_pos.shape[-1])
    if bias is not None:
        bias = bias.expand(b, hkv, bias.shape[-1])
    return attention_triton(query, key, value, qp, kp, bias, scaling, window)


def triton_pod_attend(query, dist, prox, q_pos, scaling, window):
    """One softmax over distant keys (``dist``: keys, values, positions, bias, read in place
    from the anchor layer) and proximal ones (``prox``: the member's own), on the kernel."""
    from kvcli_kernels.triton_pod import pod_attention_triton  # imports triton: only when it runs

    kd, vd, pd, bd = dist
    kp, vp, pp, bp = prox
    b, hkv = kp.shape[0], kp.shape[1]
    qp = q_pos.reshape(1, -1).expand(b, -1) if q_pos.dim() == 1 else q_pos

    def heads(t):
        return None if t is None else t.expand(b, hkv, t.shape[-1])

    return pod_attention_triton(query, kp, vp, heads(pp), kd, vd, heads(pd), heads(bp), heads(bd), qp, scaling, window)


def _flash_with_fallback(query, key, value, q_pos, k_pos, bias, scaling, window):
    fallback = triton_attend if kernels_usable(query.device) else attend
    return flash.flash_attend(query, key, value, q_pos, k_pos, bias, scaling, window, fallback=fallback)


def get_backend(name: str):
    """The attention callable for a resolved backend name."""
    if name == "triton":
        return triton_attend
    if name == "flash":
        return _flash_with_fallback
    if name != "sdpa":
        raise ValueError(f"unresolved attention backend {name!r} (call resolve_backend first)")
    return attend


# ---- compression kernels: follow the run's backend ----------------------------------------------

_ACTIVE: contextvars.ContextVar[str] = contextvars.ContextVar("kvcli_backend", default="sdpa")


@contextlib.contextmanager
def active_backend(name: str) -> Iterator[None]:
    """Compression inside this block uses the kernels of backend ``name`` (the engine
    wraps each ``method.compress`` in it)."""
    token = _ACTIVE.set(name)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def compression_kernels(device: torch.device | str) -> bool:
    """Whether compression now should use the Triton kernels for tensors on ``device``."""
    return _ACTIVE.get() in KERNEL_BACKENDS and kernels_usable(device)


def merge_sets(keys, values, counts, set_ids, pivots, sigma, value_mode, count_weighted):
    """``kvcli_kernels.merge_sets`` (reference) or its Triton kernel, per ``active_backend``."""
    if compression_kernels(keys.device):
        from kvcli_kernels.triton_merge import merge_sets_triton  # imports triton: only when it runs

        return merge_sets_triton(keys, values, counts, set_ids, pivots, sigma, value_mode, count_weighted)
    return kvcli_kernels.merge_sets(keys, values, counts, set_ids, pivots, sigma, value_mode, count_weighted)


def adjacent_similarity(keys: torch.Tensor) -> torch.Tensor:
    """Cosine of each entry's key with the next one's, ``[B, H, n, D]`` -> float32
    ``[B, H, n-1]``: the Triton kernel per ``active_backend``, else torch."""
    b, h, n, d = keys.shape
    if n >= 2 and compression_kernels(keys.device):
        from kvcli_kernels.triton_merge import adjacent_cosine_triton  # imports triton: only when it runs

        return adjacent_cosine_triton(keys.reshape(b * h, n, d)).view(b, h, n - 1)
    kf = keys.float()
    return F.cosine_similarity(kf[:, :, :-1], kf[:, :, 1:], dim=-1, eps=1e-8)
