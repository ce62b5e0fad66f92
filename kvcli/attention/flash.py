"""flash-attn behind kvcli's attention signature, used only where it computes the same thing.

flash-attn (optional extra ``kvcli[gpu]``; imported lazily, never at kvcli import time)
masks by *index*: with ``causal=True`` query ``i`` of ``Lq`` sees key ``j`` of ``Lk`` iff
``j <= i + Lk - Lq`` (bottom-right aligned), and ``window_size=(left, 0)`` adds
``j >= i + Lk - Lq - left``.  kvcli masks by *logical position* (``reference.allowed_mask``:
``k_pos <= q_pos`` and, on sliding-window layers, ``q_pos - k_pos < window``) and may add a
per-entry ``log(count)`` bias to the logits.  flash-attn cannot add such a bias and cannot
express an arbitrary position mask, so every call is first checked by ``flash_plan`` (a
pure function, testable without a GPU).  flash is used when all of these hold:

* CUDA tensors in float16/bfloat16, key and value head dim equal and <= 256;
* no count bias (``bias is None``: the method does not merge, or no merged entry exists
  in a layer whose counts were never materialised);
* the queries sit at consecutive positions ``p0 .. p0+Lq-1`` and are the last ``Lq`` keys
  (the chunk just appended);
* without a window: every older key is at a position ``< p0`` (gaps allowed: compressed
  caches qualify, since index order then equals causal order);
* with a window ``W``: the last ``Lq + W - 1`` keys are at consecutive positions ending at
  the last query (index distance = position distance where the window can reach), and
  every key before them is at a position ``<= p0 - W`` (outside every query's window).

Otherwise the call is *declined* and runs on the fallback the caller gives (kvcli's Triton
kernel where it can run, else the torch reference ``reference.attend``); results are the
same either way, only the speed differs.  The check costs one small reduction and one
host sync per call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere or newer


@dataclass(frozen=True)
class FlashPlan:
    """Whether flash-attn computes this call exactly; ``window_left`` for its window_size."""

    ok: bool
    reason: str = ""
    window_left: int = -1


def _decline(reason: str) -> FlashPlan:
    return FlashPlan(False, reason)


def flash_plan(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    bias: torch.Tensor | None,
    window: int | None,
    dtype: torch.dtype,
    head_dim: int,
    v_head_dim: int,
    device_type: str,
) -> FlashPlan:
    """Decide whether flash-attn's index mask equals kvcli's position mask for this call.

    ``q_pos``: ``[Lq]`` (or ``[B, Lq]``) positions of the queries; ``k_pos``: ``[B, H', Lk]``
    (``H'`` = 1 when heads share positions) or ``[Lk]``.  Pure: reads its arguments only.
    """
    if device_type != "cuda":
        return _decline(f"flash-attn runs on CUDA tensors only (got {device_type})")
    if dtype not in FLASH_DTYPES:
        return _decline(f"flash-attn needs float16/bfloat16 (got {str(dtype).replace('torch.', '')})")
    if head_dim != v_head_dim or head_dim > MAX_HEAD_DIM:
        return _decline(f"flash-attn needs equal key/value head dims <= {MAX_HEAD_DIM} (got {head_dim}/{v_head_dim})")
    if bias is not None:
        return _decline("flash-attn cannot add the per-entry log-count bias of merged entries")
    if window is not None and int(window) < 1:
        return _decline(f"invalid sliding window {window}")
    qp = q_pos.reshape(-1, q_pos.shape[-1])[0].long()  # engine batches share positions
    lq = qp.shape[0]
    kp = k_pos.reshape(-1, k_pos.shape[-1]).long()  # [rows, Lk]
    lk = kp.shape[-1]
    if lq == 0:
        return _decline("no queries")
    if q_pos.dim() > 1 and not bool((q_pos.reshape(-1, lq) == qp).all()):
        return _decline("query positions differ across the batch")
    if lk < lq:
        return _decline("fewer keys than queries: the queries are not the newest keys")
    p0 = qp[0]
    steps = torch.arange(lq, device=qp.device)
    checks = [(qp == p0 + steps).all(), (kp[:, lk - lq :] == qp).all()]  # consecutive queries = newest keys
    if window is None:
        if lk > lq:
            checks.append((kp[:, : lk - lq] < p0).all())
    else:
        w = int(window)
        reach = min(lk, lq + w - 1)  # keys any query's window can reach, by index
        expect = qp[-1] - reach + 1 + torch.arange(reach, device=kp.device)
        checks.append((kp[:, lk - reach :] == expect).all())
        if lk > reach:
            checks.append((kp[:, : lk - reach] <= p0 - w).all())
    if not bool(torch.stack(checks).all()):  # one host sync
        return _decline("positions are not a causal layout flash-attn can express (gapped or out of order)")
    return FlashPlan(True, "", -1 if window is None else int(window) - 1)


# ---- availability ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _import_flash() -> tuple[Callable | None, str]:
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415 - optional, lazy
    except Exception as exc:  # not installed, or built for another torch/CUDA
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"flash-attn is not importable ({first})"
    return flash_attn_func, ""


def flash_unavailable_reason() -> str | None:
    """None when flash-attn can run here; else why not (one line)."""
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA GPU; none is available here"
    cap = torch.cuda.get_device_capability()
    if tuple(cap) < MIN_CAPABILITY:
        return f"flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0); this one is {cap[0]}.{cap[1]}"
    fn, why = _import_flash()
    return None if fn is not None else why


# ---- the call --------------------------------------------------------------------------------


def run_flash(query, key, value, scaling: float, plan: FlashPlan) -> torch.Tensor:
    """flash_attn_func on kvcli's ``[B, H, L, D]`` layout (it wants ``[B, L, H, D]``; the
    transposes are views, flash only needs the last dim contiguous).  Grouped-query heads
    map the same way in both (query head ``h`` uses KV head ``h // (Hq // Hkv)``)."""
    fn, why = _import_flash()
    if fn is None:
        raise RuntimeError(why)
    out = fn(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p=0.0,
        softmax_scale=float(scaling),
        causal=True,
        window_size=(plan.window_left, 0 if plan.window_left >= 0 else -1),
    )
    return out.transpose(1, 2)


def flash_attend(query, key, value, q_pos, k_pos, bias, scaling, window, fallback: Callable) -> torch.Tensor:
    """``reference.attend``'s signature: flash-attn where ``flash_plan`` allows, else
    ``fallback`` (same arguments) for this call."""
    plan = flash_plan(q_pos, k_pos, bias, window, query.dtype, query.shape[-1], value.shape[-1], query.device.type)
    if not plan.ok:
        return fallback(query, key, value, q_pos, k_pos, bias, scaling, window)
    return run_flash(query, key, value, scaling, plan)
