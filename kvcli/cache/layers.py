"""The cache layers kvcli owns: per-layer storage that physically shrinks.

It plugs into transformers through the public ``Cache`` / ``CacheLayerMixin`` API, so any
architecture transformers supports works unchanged.  Storage is per KV head (never
expanded for grouped-query attention).  Each entry carries its logical position and a
count of the tokens it stands for; both are materialised only once a method has
compressed the layer (until then positions are ``0..n-1`` and counts are ones), so the
full cache holds exactly what transformers' own cache would hold.

Who does what: the cache owns the tensors; the engine tells it the logical positions of
the tokens in the current forward (``begin_forward``); the attention function reads
positions/biases and adds attention statistics; methods rewrite a layer only through
``GrowingLayer.gather`` / ``GrowingLayer.assign``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Clock:
    """Shared by the layers of one cache: positions of the tokens now being forwarded."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # [Lq] long
        # A rolled-back pass whose scored layers attend only over keys they choose (a local
        # reconstruction pass): those layers do not store its entries (``GrowingLayer.pending``).
        self.detached = False

    def now(self) -> torch.Tensor:
        """The positions announced for the current forward."""
        if self.positions is None:
            raise RuntimeError("no forward in progress: KVCache.begin_forward announces the positions")
        return self.positions


class GrowingLayer(CacheLayerMixin):
    """A layer whose cache grows with the document: the one compression applies to.

    Tensors: ``keys``/``values`` ``[B, H, cap, D]`` (only ``[:length]`` is valid; ``cap``
    exceeds ``length`` only after ``reserve`` for decoding, so appends do not copy the
    cache per token).  Optional per-entry metadata, ``[B, H, cap]``: ``positions``
    (long), ``counts`` (float, tokens merged into the entry), ``scores`` (accumulated
    attention received, H2O-style) and ``obs`` (attention from the latest observation
    window, SnapKV-style).

    During a detached pass (``Clock.detached``), a layer that tracks scores stores nothing:
    the forward's keys and values wait in ``pending`` for this layer's attention, which
    takes them (the pass is rolled back anyway, so the cache never grows by it).
    """

    is_sliding = False
    #: Whether the layer can leave a detached pass unstored (``KVCache.detachable``).
    detachable = True
    is_compileable = False
    keys: torch.Tensor  # once initialized (the first ``update``)
    values: torch.Tensor

    def __init__(self, clock: Clock, layer_idx: int) -> None:
        super().__init__()
        self.clock = clock
        self.layer_idx = layer_idx
        self.track_scores = False  # set by the cache when the method needs statistics
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.positions: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.obs: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---- transformers' layer API -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.clock.detached and self.track_scores:
            self.pending = (key_states, value_states)
            return self.keys[:, :, : self.length], self.values[:, :, : self.length]
        self.keys = self._append(self.keys, key_states, self.length)
        self._append_entries(value_states)
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def _append_entries(self, value_states: torch.Tensor) -> None:
        """Append values and per-entry metadata for the tokens now being forwarded."""
        n, old = value_states.shape[-2], self.length
        self.values = self._append(self.values, value_states, old)
        if self.positions is not None:
            pos = self.clock.now().to(self.positions.device)
            pos = pos.view(1, 1, n).expand(self.positions.shape[0], self.positions.shape[1], n)
            self.positions = self._append(self.positions, pos, old)
        if self.counts is not None:
            self.counts = self._append(self.counts, self.counts.new_ones(self._meta_shape(n)), old)
        if self.scores is not None or self.track_scores:
            cur = self.scores
            if cur is None:
                cur = torch.zeros(self._meta_shape(old), dtype=torch.float32, device=value_states.device)
            self.scores = self._append(cur, cur.new_zeros(self._meta_shape(n)), old)
        if self.obs is not None:
            self.obs = self._append(self.obs, self.obs.new_zeros(self._meta_shape(n)), old)
        self.length = old + n

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget everything stored (transformers' ``Cache.reset``)."""
        self.keys = self.values = None  # type: ignore[assignment]
        self.is_initialized = False
        self._clear()

    # ---- storage helpers -----------------------------------------------------------
    def _meta_shape(self, n: int) -> tuple[int, int, int]:
        return (self.values.shape[0], self.values.shape[1], n)

    @staticmethod
    def _append(buf: torch.Tensor, new: torch.Tensor, used: int) -> torch.Tensor:
        """Write ``new`` after the first ``used`` entries along dim 2, in place when room."""
        n = new.shape[2]
        if used + n <= buf.shape[2]:
            buf[:, :, used : used + n] = new
            return buf
        return torch.cat([buf[:, :, :used], new], dim=2)

    def reserve(self, extra: int) -> None:
        """Pre-allocate room for ``extra`` more entries, so decoding appends in place."""
        if not self.is_initialized:
            return
        need = self.length + extra
        for name in ("keys", "values", "positions", "counts", "scores", "obs"):  # keys: None in a PoD member
            t = getattr(self, name)
            if t is not None and t.shape[2] < need:
                out = t.new_zeros((*t.shape[:2], need, *t.shape[3:]))
                out[:, :, : self.length] = t[:, :, : self.length]
                setattr(self, name, out)

    def compact(self) -> None:
        """Drop spare capacity so the tensors hold exactly ``length`` entries."""
        if not self.is_initialized:
            return
        for name in ("keys", "values", "positions", "counts", "scores", "obs"):
            t = getattr(self, name)
            if t is not None and t.shape[2] != self.length:
                setattr(self, name, t[:, :, : self.length].clone())

    # ---- what methods and the attention function read ----------------------------------
    def key_positions(self) -> torch.Tensor:
        """Logical positions ``[B, H, length]`` (materialised lazily for untouched layers)."""
        if self.positions is not None:
            return self.positions[:, :, : self.length]
        b, h = self.values.shape[:2]
        return torch.arange(self.length, device=self.values.device).view(1, 1, -1).expand(b, h, -1)

    def entry_counts(self) -> torch.Tensor:
        if self.counts is not None:
            return self.counts[:, :, : self.length]
        return torch.ones(self._meta_shape(self.length), dtype=torch.float32, device=self.values.device)

    def valid(self, name: str) -> torch.Tensor | None:
        """The first ``length`` entries of tensor ``name`` (``None`` for absent metadata)."""
        t = getattr(self, name)
        return None if t is None else t[:, :, : self.length]

    def require(self, name: str) -> torch.Tensor:
        """``valid(name)`` for a tensor the caller needs (statistics exist once the method asked for them)."""
        t = self.valid(name)
        if t is None:
            raise RuntimeError(f"layer {self.layer_idx} holds no {name}")
        return t

    def _stat(self, name: str, device: torch.device) -> torch.Tensor:
        """Statistic ``name`` covering every entry (created as zeros, or grown, on first need)."""
        t = getattr(self, name)
        if t is None or t.shape[2] < self.length:
            grown = torch.zeros(self._meta_shape(self.length), dtype=torch.float32, device=device)
            if t is not None:
                grown[:, :, : t.shape[2]] = t
            setattr(self, name, grown)
            t = grown
        return t

    def add_scores(self, received: torch.Tensor, obs_max: bool = False) -> None:
        """Record attention received by each entry from an observation window or a question
        ``[B, H, n]`` (the first ``n`` entries): summed into ``scores``; ``obs`` holds the
        latest one (``obs_max``: the larger of it and what ``obs`` holds, for a further question)."""
        n = received.shape[-1]
        received = received.to(torch.float32)
        self._stat("scores", received.device)[:, :, :n] += received
        obs = self._stat("obs", received.device)
        obs[:, :, :n] = torch.maximum(obs[:, :, :n], received) if obs_max else received

    def raise_scores(self, importance: torch.Tensor, start: int) -> None:
        """Max-accumulate importance ``[B, H, n]`` (reconstruction scores) into entries
        ``start .. start + n``; ``scores`` and ``obs`` both hold it, so every scored method reads it."""
        n = importance.shape[-1]
        importance = importance.to(torch.float32)
        for name in ("scores", "obs"):
            t = self._stat(name, importance.device)[:, :, start : start + n]
            t.copy_(torch.maximum(t, importance))

    # ---- what methods write -------------------------------------------------------------
    def gather(self, idx: torch.Tensor) -> None:
        """Keep only entries ``idx`` (``[B, H, K]``, sorted per head): eviction."""
        positions = self.key_positions()
        self.assign(
            keys=self._take(self.keys, idx),
            values=self._take(self.values, idx),
            positions=positions.gather(2, idx),
            counts=None if self.counts is None else self._take(self.counts, idx),
            scores=None if self.scores is None else self._take(self.scores, idx),
            obs=None if self.obs is None else self._take(self.obs, idx),
        )

    def _take(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = t[:, :, : self.length]
        if t.dim() == 4:
            return t.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
        return t.gather(2, idx)

    def assign(self, keys, values, positions, counts=None, scores=None, obs=None) -> None:
        """Replace the layer's contents with new (smaller) tensors."""
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.positions = positions.contiguous()
        self.counts = None if counts is None else counts.contiguous()
        self.scores = None if scores is None else scores.contiguous()
        self.obs = None if obs is None else obs.contiguous()
        self.length = keys.shape[2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(self.keys, self.values, self.positions, self.counts, self.scores, self.obs)

    # ---- checkpoints for answering several questions from one context --------------------
    def checkpoint(self) -> dict:
        return {"length": self.length}

    def rollback(self, state: dict) -> None:
        # Only appends happen after a checkpoint (no compression while answering), so the
        # entries before ``length`` are untouched; scores of the context are restored too.
        # The room the rolled-back tokens took is given back (a scoring pass or an answer
        # must not leave the cache physically larger than its entries).
        self.length = state["length"]
        self.pending = None
        self.compact()


class SharedKeyLayer(GrowingLayer):
    """A growing layer in a PoD block that is not the block's first layer.

    It stores its own values for every entry, but its own keys only for proximal entries:
    the first ``n_head`` (sinks) and the last ``n_tail`` (recent window).  Keys of distant
    entries are read from the block's anchor layer, whose entries have the same logical
    positions (PoD keeps the layouts in step).  ``keys`` is not stored here: attention gets
    ``[own head | anchor's distant keys | own tail]`` assembled per forward, or, with
    ``split_keys`` (set by the engine when the Triton PoD kernel attends), a zero-length
    stand-in from ``update``: the attention function then reads ``key_parts()`` in place.
    """

    split_keys = False
    detachable = False  # its distant keys are its anchor's: the two must hold the same entries
    head_keys: torch.Tensor  # once initialized (the first ``update``)
    tail_keys: torch.Tensor

    def __init__(self, clock: Clock, layer_idx: int, anchor: GrowingLayer, n_head: int) -> None:
        super().__init__(clock, layer_idx)
        self.anchor = anchor
        self.n_head_max = n_head

    @classmethod
    def from_layer(cls, layer: GrowingLayer, anchor: GrowingLayer, n_head: int) -> SharedKeyLayer:
        new = cls(layer.clock, layer.layer_idx, anchor, n_head)
        new.track_scores = layer.track_scores
        return new

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self.head_keys = self.keys
        self.tail_keys = self.keys
        self.keys = None  # type: ignore[assignment]  # no keys of its own: see key_parts()

    @property
    def n_tail(self) -> int:
        return self.tail_keys.shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        room = max(0, self.n_head_max - self.head_keys.shape[2]) if self.n_tail == 0 else 0
        if room:
            self.head_keys = torch.cat([self.head_keys, key_states[:, :, :room]], dim=2)
        self.tail_keys = torch.cat([self.tail_keys, key_states[:, :, room:]], dim=2)
        self._append_entries(value_states)
        keys = self.head_keys[:, :, :0] if self.split_keys else self.assembled_keys()
        return keys, self.values[:, :, : self.length]

    def key_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(own head keys, anchor's distant keys, own tail keys)``: the layer's keys in
        entry order, none of them copied (the distant part is a view of the anchor's)."""
        h = self.head_keys.shape[2]
        n_dist = self.length - h - self.n_tail
        return self.head_keys, self.anchor.keys[:, :, h : h + n_dist], self.tail_keys

    def assembled_keys(self) -> torch.Tensor:
        head, distant, tail = self.key_parts()
        if distant.shape[2] == 0:
            return torch.cat([head, tail], dim=2)
        return torch.cat([head, distant, tail], dim=2)

    def valid(self, name: str) -> torch.Tensor | None:
        if name == "keys":
            return self.assembled_keys()
        return super().valid(name)

    def drop_distant_keys(self, n_tail: int) -> None:
        """Entries older than the recent window become distant: forget their own keys."""
        if n_tail < self.n_tail:
            self.tail_keys = self.tail_keys[:, :, self.n_tail - n_tail :].clone()

    def assign(self, keys, values, positions, counts=None, scores=None, obs=None) -> None:
        """``keys`` here are the proximal keys only: ``(head_keys, tail_keys)``."""
        self.head_keys, self.tail_keys = keys
        self.values = values.contiguous()
        self.positions = positions.contiguous()
        self.counts = None if counts is None else counts.contiguous()
        self.scores = None if scores is None else scores.contiguous()
        self.obs = None if obs is None else obs.contiguous()
        self.length = values.shape[2]

    def gather(self, idx):  # token selection in PoD goes through the block, never per layer
        raise RuntimeError("SharedKeyLayer entries are rewritten by PoD for the whole block")

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return tensor_bytes(
            self.head_keys, self.tail_keys, self.values, self.positions, self.counts, self.scores, self.obs
        )

    def checkpoint(self) -> dict:
        if not self.is_initialized:  # nothing forwarded yet: no proximal keys to count
            return {"length": 0, "n_tail": 0, "n_head": 0}
        return {"length": self.length, "n_tail": self.n_tail, "n_head": self.head_keys.shape[2]}

    def rollback(self, state: dict) -> None:
        self.length = state["length"]
        if self.is_initialized:
            if self.head_keys.shape[2] != state["n_head"]:
                self.head_keys = self.head_keys[:, :, : state["n_head"]].clone()
            if self.tail_keys.shape[2] != state["n_tail"]:
                self.tail_keys = self.tail_keys[:, :, : state["n_tail"]].clone()
            self.compact()


class WindowLayer(CacheLayerMixin):
    """A sliding-window layer (e.g. Gemma 3's local layers): keeps its last window, untouched
    by compression; its size is bounded by the window whatever the document length."""

    is_sliding = True
    is_compileable = False
    keys: torch.Tensor  # once initialized (the first ``update``)
    values: torch.Tensor

    def __init__(self, clock: Clock, layer_idx: int, sliding_window: int) -> None:
        super().__init__()
        self.clock = clock
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.seen = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        full_k = torch.cat([self.keys, key_states], dim=2)
        full_v = torch.cat([self.values, value_states], dim=2)
        self.seen += key_states.shape[2]
        keep = max(self.sliding_window - 1, 0)
        start = full_k.shape[2] - keep
        if start > 0:  # a copy, not a view: the dropped part's storage must really be freed
            self.keys, self.values = full_k[:, :, start:].clone(), full_v[:, :, start:].clone()
        else:
            self.keys, self.values = full_k, full_v
        self._returned = full_k.shape[2]
        return full_k, full_v

    def key_positions(self) -> torch.Tensor:
        """Positions of the entries returned by the latest ``update`` (contiguous)."""
        n = self._returned
        b, h = self.keys.shape[:2]
        start = self.seen - n
        return torch.arange(start, self.seen, device=self.keys.device).view(1, 1, -1).expand(b, h, -1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.keys.shape[2] if self.is_initialized else 0
        return held + query_length, max(self.seen - held, 0)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.sliding_window

    def reset(self) -> None:
        """Forget everything stored (transformers' ``Cache.reset``)."""
        self.keys = self.values = None  # type: ignore[assignment]
        self.is_initialized = False
        self.seen = 0

    def reserve(self, extra: int) -> None:  # bounded by the window: nothing to reserve
        return None

    def compact(self) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys.clone(), self.values.clone()

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values) if self.is_initialized else 0

    def checkpoint(self) -> dict:
        return {"keys": self.keys, "values": self.values, "seen": self.seen}

    def rollback(self, state: dict) -> None:
        # ``update`` never writes into the saved tensors (it concatenates), so keeping
        # references is a free snapshot.
        self.keys, self.values, self.seen = state["keys"], state["values"], state["seen"]
