"""kvcli's attention function, registered with transformers' attention-function registry
(importing this module registers it; ``ATTN_NAME`` is the name models load it by).

Why a function of our own: a compressed cache is no longer a contiguous run of positions,
so the causal mask must come from each entry's logical position, merged entries may carry
a log-count bias, and methods need attention statistics.  Doing this here (instead of in
patched model classes) keeps every architecture transformers supports working.

Masks are built from positions, so transformers is asked for none: "kvcli" is not in its
mask registry, which makes it skip mask construction entirely.

Which function computes the attention is the run's backend (``backends``: the torch
reference ``reference.attend``, kvcli's Triton kernels, or flash-attn where it is exact).

Statistics are recorded by the forward's collector (``stats``: an observation window, a
question, or a reconstruction pass), always on a bounded set of queries, so no method needs
eager attention or memory quadratic in the document.  A collector that ``attends`` (a local
reconstruction pass) computes a scored layer's output itself, over the keys it chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface

from ..cache import GrowingLayer, KVCache, SharedKeyLayer
from .backends import get_backend, triton_pod_attend
from .pod_train import TrainAttention, train_attention
from .reference import attend
from .stats import Collector

ATTN_NAME = "kvcli"


@dataclass
class RunState:
    """Per-run settings the attention function needs; passed to the model as a kwarg."""

    cache: KVCache
    count_bias: bool = False  # add log(count) to merged entries' logits
    backend: str = "sdpa"
    # What the current forward records for scored methods (None: nothing); set by the engine.
    collector: Collector | None = None
    extra: dict = field(default_factory=dict)
    # Called as ``observer(layer_idx, query, q_pos, scaling)`` after every layer's attention
    # (post-RoPE queries of the current forward; ``kvcli calibrate`` keeps a few of them).
    observer: Callable | None = None


def _heads_share_positions(layer) -> bool:
    return not isinstance(layer, GrowingLayer) or layer.positions is None or layer.positions.shape[1] == 1


def kvcli_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs
):
    if kwargs.get("softcap") is not None:
        raise RuntimeError("attention logit soft-capping is not supported by kvcli")
    train: TrainAttention | None = kwargs.get("kvcli_train")
    if train is not None:  # a training forward over a whole sequence (``kvcli adapt``): no cache
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = train_attention(module, query, key, value, train, scale, sliding_window)
        return out.transpose(1, 2).contiguous(), None
    state: RunState | None = kwargs.get("kvcli_state")
    if state is None:
        raise RuntimeError("the 'kvcli' attention implementation runs only inside kvcli's engine")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = state.cache.layers[module.layer_idx]
    q_pos = state.cache.clock.now().to(query.device)
    k_pos = layer.key_positions()
    if _heads_share_positions(layer):
        k_pos = k_pos[:, :1]
    bias = None
    if state.count_bias and isinstance(layer, GrowingLayer) and layer.counts is not None:
        bias = torch.log(layer.entry_counts())
    window = sliding_window if not isinstance(layer, GrowingLayer) else None
    # A PoD member whose keys the cache did not assemble (split_keys): read them in place.
    split = isinstance(layer, SharedKeyLayer) and layer.split_keys
    if split:
        parts = layer.key_parts()

    collector = state.collector
    if collector is not None and not (isinstance(layer, GrowingLayer) and layer.track_scores):
        collector = None  # this layer records nothing (a sliding layer, a layer that keeps all)
    observe_only = state.collector is not None and state.collector.observe_only
    if collector is not None and collector.attends:
        # The collector attends itself (a local reconstruction pass): output and statistics
        # from one softmax over the keys it chooses.
        # A detached pass (``Clock.detached``) left its own entries in ``layer.pending``.
        pending, layer.pending = layer.pending, None
        out = collector.attend(layer, query, parts if split else key, value, q_pos, k_pos, bias, scaling, pending)
    elif split and not observe_only:
        out = _pod_member_attention(layer, parts, query, value, q_pos, k_pos, bias, scaling, window)
    else:
        if split:
            key = torch.cat(parts, dim=2)
        if observe_only:
            # Query-aware scoring: the probe tokens (the user's question) only observe.
            out = attend(query, key, value, q_pos, k_pos, bias, scaling, window)
        else:
            out = get_backend(state.backend)(query, key, value, q_pos, k_pos, bias, scaling, window)
    if collector is not None and not collector.attends:
        collector(layer, query, parts if split else key, q_pos, k_pos, bias, scaling)
    if state.observer is not None:
        state.observer(module.layer_idx, query, q_pos, scaling)
    return out.transpose(1, 2).contiguous(), None


def _pod_member_attention(layer, parts, query, value, q_pos, k_pos, bias, scaling, window):
    """Triton PoD kernel: the anchor's distant keys are read where they are; only the
    member's own proximal parts (head sinks + recent tail, bounded) are joined."""
    head, distant, tail = parts
    h, nd = head.shape[2], distant.shape[2]

    def distant_proximal(t):
        if t is None:
            return None, None
        return t[:, :, h : h + nd], torch.cat([t[:, :, :h], t[:, :, h + nd :]], dim=2)

    vd, vp = distant_proximal(value)
    pd, pp = distant_proximal(k_pos)
    bd, bp = distant_proximal(bias)
    return triton_pod_attend(
        query, (distant, vd, pd, bd), (torch.cat([head, tail], dim=2), vp, pp, bp), q_pos, scaling, window
    )


AttentionInterface.register(ATTN_NAME, kvcli_attention)
