"""``pod``: Proximal tokens over Distant tokens (Ma et al., 2412.02252), training-free.

Proximal entries (the first ``n_sink`` and those within the most recent ``n_r`` positions)
keep their full KV in every layer.  The growing layers are grouped into blocks of
consecutive growing layers; only a block's first layer (the anchor) stores keys of distant
entries; every other layer of the block stores its own values for all entries and its own
keys for proximal entries only (``cache.SharedKeyLayer``), and attends with one softmax
over its own proximal keys and the anchor's distant keys, with its own values.

Choices (the paper leaves these to its training setup):

* ``n_r`` scales with the context: ``max(recent_min, recent x tokens seen)`` (paper: 4080
  of 32K = 12.5%), ``n_sink = 16`` as in the paper (its ``n_s``).
* Plain ``pod`` keeps every token, so ``--budget`` does not apply to it.  ``pod+X`` holds
  the budget exactly: when the budget is smaller than ``n_sink + n_r`` the recent window
  shrinks to fit (the first ``n_sink`` entries are never merged, so the floor is ``n_sink + 1``).
* Blocks: ``block_size`` consecutive growing layers (default 2), or explicit ``blocks``,
  or a calibration profile written by ``kvcli calibrate`` (picked up automatically for the
  same model), which groups layers whose distant-token attention is similar (JSD).
* Post-training adaptation (``kvcli adapt``, ``docs/pod_adapt.md``) trains low-rank deltas
  on the members' query/key projections; option ``adapter``: ``auto`` (default) uses the
  one in kvcli's cache for this model and grouping when there is one, ``none`` runs
  training-free, a path uses that file (it must fit).  The engine resolves and applies it
  (``engine.models.adapter``); ``adapter_used`` says which ran.
* ``pod+X`` compresses the distant entries of each block further with method X, with one
  layout for the whole block (so shared keys still line up): X sees the block's layers as
  extra heads of one layer, with the block's summed statistics.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..core import defaults
from ..core.budget import Budget
from ..core.errors import KvcliError
from ..core.fileio import cache_dir
from .base import NOT_AN_OPTION, Method, fraction, integer, state

if TYPE_CHECKING:  # torch and the cache load when PoD runs, not when its options are checked
    import torch

    from ..attention import RunState
    from ..cache import GrowingLayer, KVCache, SharedKeyLayer
    from ..cache.sizing import CacheShape, EstimateStep, LayerEstimate


def calibration_path(config: Any) -> Path:
    """Where ``kvcli calibrate`` stores the grouping profile for a model."""
    name = str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "model"))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip("/"))[-120:] or "model"
    return cache_dir() / "calibration" / f"{safe}.json"


def _block_layers(cache: KVCache, block: list[int]) -> tuple[GrowingLayer, list[SharedKeyLayer]]:
    """A block's anchor and members, as ``PoD.attach`` made them."""
    from ..cache import GrowingLayer, SharedKeyLayer

    anchor = cache.kv_layers[block[0]]
    members = [m for m in (cache.kv_layers[i] for i in block[1:]) if isinstance(m, SharedKeyLayer)]
    if not isinstance(anchor, GrowingLayer) or len(members) != len(block) - 1:
        raise RuntimeError(f"pod: block {block} is not laid out as attach() made it")
    return anchor, members


def _block_lists(blocks: Any, where: str) -> list[list[int]]:
    """``blocks`` as lists of layer indices, or a one-line error (whether they partition the
    growing layers is checked once the model is known, in ``PoD.choose_blocks``)."""
    try:
        if isinstance(blocks, (str, bytes)) or any(isinstance(b, (str, bytes)) for b in blocks):
            raise TypeError
        out = [[operator.index(i) for i in b] for b in blocks]
    except TypeError:
        raise KvcliError(
            f"pod: {where} must be lists of layer indices, e.g. [[0, 1], [2, 3]]; got {blocks!r}"
        ) from None
    if not out or not all(out):
        raise KvcliError(f"pod: {where} must be non-empty lists of layer indices; got {blocks!r}")
    return out


@dataclass
class _BlockCounts:
    """A PoD block's storage as entry counts, for ``PoD.estimate_layers`` (every block holds
    the same counts): entries per layer, the members' own head and tail keys, and whether
    the block has been rewritten (then per-entry positions, and counts for a merging inner
    method, exist)."""

    entries: int = 0
    head: int = 0
    tail: int = 0
    compressed: bool = False

    def forward(self, chunk: int, n_sink: int) -> None:
        """``SharedKeyLayer.update``: the head fills first, while the tail is empty."""
        take = min(chunk, max(0, n_sink - self.head)) if self.tail == 0 else 0
        self.entries += chunk
        self.head += take
        self.tail += chunk - take


@dataclass
class PoD(Method):
    name: ClassVar[str] = "pod"
    description: ClassVar[str] = "PoD: full KV for proximal tokens, distant keys shared across layers"

    n_sink: int = defaults.POD_N_SINK  # first entries that are proximal (the paper's n_s)
    recent: float = 0.125  # recent window as a share of the tokens seen ...
    recent_min: int = 256  # ... and at least this many positions
    block_size: int = 2  # consecutive growing layers per block (without blocks or a profile)
    blocks: list[list[int]] | None = None  # explicit blocks of layer indices
    profile: str | None = None  # a calibration profile (default: the model's, when ``kvcli calibrate`` wrote one)
    adapter: str = "auto"  # auto | none | a file (kvcli adapt): deltas on the members' q/k projections
    inner: Method | None = field(default=None, metadata=NOT_AN_OPTION)  # pod+X: compresses distant entries further

    chosen_blocks: list[list[int]] = state(list)  # the blocks in use (``attach`` / the first estimate moment)
    blocks_source: str = state(str)
    adapter_used: str = state(str)  # the adapter file the run applies, or "none" (set by the engine)
    _counts: _BlockCounts = state(lambda: _BlockCounts())  # estimate_layers' replay

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recent = fraction(self, "recent", self.recent)
        self.recent_min = integer(self, "recent_min", self.recent_min, minimum=0)
        self.block_size = integer(self, "block_size", self.block_size, minimum=1)
        if self.blocks is not None:
            self.blocks = _block_lists(self.blocks, "option blocks")
        if self.profile is not None and not isinstance(self.profile, str):
            raise KvcliError(f"pod: option profile must be a file name, got {self.profile!r}")
        if not isinstance(self.adapter, str) or not self.adapter.strip():
            raise KvcliError(f"pod: option adapter must be auto, none or an adapter file, got {self.adapter!r}")

    @property
    def label(self) -> str:
        return self.name if self.inner is None else f"{self.name}+{self.inner.name}"

    @property
    def needs_scores(self) -> bool:
        return self.inner is not None and self.inner.needs_scores

    @property
    def count_bias(self) -> bool:
        return self.inner is not None and self.inner.count_bias

    @property
    def stores_counts(self) -> bool:
        return self.inner is not None and self.inner.stores_counts

    @property
    def uses_budget(self) -> bool:
        return self.inner is not None  # plain PoD keeps every token: its saving is the shared keys

    def options(self) -> dict:
        out = {**super().options(), "blocks": self.chosen_blocks, "blocks_source": self.blocks_source}
        if self.adapter_used:  # what ran, so a saved context reloads with the same adapter
            out["adapter"] = self.adapter_used
        if self.inner is not None:
            out["inner"] = self.inner.options()
        return out

    # ---- layer grouping -------------------------------------------------------------------
    def choose_blocks(self, growing: list[int], config: Any) -> list[list[int]]:
        if self.blocks is not None:
            blocks, self.blocks_source = self.blocks, "option"
        else:
            path = Path(self.profile) if self.profile else calibration_path(config)
            if path.is_file():
                try:
                    blocks = json.loads(path.read_text())["blocks"]
                except (ValueError, KeyError, TypeError):
                    raise KvcliError(f"pod: calibration profile {path} is not valid (re-run kvcli calibrate)") from None
                blocks = _block_lists(blocks, f"calibration profile {path}")
                self.blocks_source = str(path)
            elif self.profile:
                raise KvcliError(f"pod: calibration profile {self.profile}: no such file")
            else:
                blocks = [growing[i : i + self.block_size] for i in range(0, len(growing), self.block_size)]
                self.blocks_source = f"block_size={self.block_size}"
        flat = [i for b in blocks for i in b]
        if sorted(flat) != sorted(growing) or len(set(flat)) != len(flat):
            raise KvcliError(f"pod: blocks {blocks} must partition the growing layers {growing}")
        for b in blocks:
            if b != sorted(b) or any(growing.index(y) != growing.index(x) + 1 for x, y in pairwise(b)):
                raise KvcliError(f"pod: block {b} is not a run of consecutive growing layers {growing}")
        return blocks

    def attach(self, cache: KVCache, state: RunState) -> None:
        """Swap the non-anchor layers of each block for shared-key storage."""
        from ..cache import GrowingLayer, SharedKeyLayer

        self.chosen_blocks = self.choose_blocks(cache.growing_indices, cache.config_ref)
        layers = cache.kv_layers
        for block in self.chosen_blocks:
            anchor = layers[block[0]]
            for idx in block[1:]:
                member = layers[idx]
                assert isinstance(anchor, GrowingLayer) and isinstance(member, GrowingLayer)  # growing layers only
                layers[idx] = SharedKeyLayer.from_layer(member, anchor, self.n_sink)

    def training_plan(self, total: int, chunk_size: int) -> list[tuple[int, int, int]]:
        """``(start, end, horizon)`` per chunk of a plain-PoD prefill of ``total`` tokens
        (``attention.pod_train``: what the members read from their anchor, chunk by chunk)."""
        from ..attention.pod_train import chunk_plan

        return chunk_plan(total, chunk_size, self.recent_window)

    def recent_window(self, seen: int) -> int:
        return max(self.recent_min, math.ceil(self.recent * seen))

    def proximal_window(self, seen: int, target: int, length: int) -> tuple[int, bool]:
        """``(n_recent, squeeze)`` after ``seen`` tokens for a block whose layers hold
        ``length`` entries: the recent window in positions, and whether the distant entries
        must be compressed to ``target`` (``pod+X`` over budget).  When squeezing, the budget
        wins over the recent window: at least one distant slot remains."""
        n_recent = self.recent_window(seen)
        squeeze = self.inner is not None and target < length
        if squeeze:
            n_recent = max(0, min(n_recent, target - min(self.n_sink, length) - 1))
        return n_recent, squeeze

    # ---- after every chunk ------------------------------------------------------------------
    def compress(self, cache: KVCache, budget: Budget) -> None:
        seen = cache.seen
        target = budget.target(seen)
        for block in self.chosen_blocks:
            anchor, members = _block_layers(cache, block)
            n_recent, squeeze = self.proximal_window(seen, target, anchor.length)
            horizon = seen - n_recent
            if squeeze:
                self._compress_distant(anchor, members, horizon, target)
            n_tail = int((anchor.key_positions()[0, 0] >= horizon).sum())
            for m in members:
                m.drop_distant_keys(n_tail)

    def _compress_distant(self, anchor: GrowingLayer, members: list[SharedKeyLayer], horizon: int, target: int) -> None:
        import torch

        from ..cache import Clock, GrowingLayer

        pos = anchor.key_positions()
        n = anchor.length
        n_head = min(self.n_sink, n)
        n_tail = int((pos[0, 0] >= horizon).sum())
        n_dist = n - n_head - n_tail
        dist_target = target - n_head - n_tail
        if n_dist <= 0 or dist_target >= n_dist:
            return
        dist_target = max(dist_target, 1)
        sl = slice(n_head, n_head + n_dist)
        layers: list[GrowingLayer] = [anchor, *members]
        h = anchor.values.shape[1]
        k = anchor.keys[:, :, sl]
        temp = GrowingLayer(Clock(), anchor.layer_idx)
        temp.is_initialized = True
        temp.keys = torch.cat([k] * len(layers), dim=1)
        temp.values = torch.cat([layer.values[:, :, sl] for layer in layers], dim=1)
        temp.length = n_dist
        temp.positions = pos[:, :, sl].repeat(1, len(layers), 1)
        if self.stores_counts:  # counts only for a merging inner method (None reads as ones)
            temp.counts = anchor.entry_counts()[:, :, sl].repeat(1, len(layers), 1)
        for stat in ("scores", "obs"):
            parts = [p for p in (layer.valid(stat) for layer in layers) if p is not None]
            if len(parts) == len(layers):
                sums = [p[:, :, sl].sum(1, keepdim=True) for p in parts]
                total = sum(sums[1:], sums[0])
                setattr(temp, stat, total.expand(-1, temp.keys.shape[1], -1).contiguous())
        assert self.inner is not None  # only pod+X squeezes
        self.inner.compress_layer(temp, dist_target)

        def join(mid: torch.Tensor | None, full: torch.Tensor | None) -> torch.Tensor | None:
            if mid is None or full is None:
                return None
            return torch.cat([full[:, :, :n_head], mid, full[:, :, n_head + n_dist :]], dim=2)

        def rewritten(j: int, layer: GrowingLayer) -> dict[str, torch.Tensor | None]:
            heads = slice(j * h, (j + 1) * h)
            return {
                "values": join(temp.values[:, heads], layer.valid("values")),
                "positions": join(temp.require("positions")[:, heads], layer.key_positions()),
                "counts": join(None if temp.counts is None else temp.counts[:, heads], layer.entry_counts()),
                "scores": join(None if temp.scores is None else temp.scores[:, heads], layer.valid("scores")),
                "obs": join(None if temp.obs is None else temp.obs[:, heads], layer.valid("obs")),
            }

        anchor.assign(join(temp.keys[:, :h], anchor.valid("keys")), **rewritten(0, anchor))
        for j, m in enumerate(members, 1):  # a copy, not a view: the dropped keys' storage must really be freed
            m.assign((m.head_keys, m.tail_keys[:, :, m.n_tail - n_tail :].clone()), **rewritten(j, m))

    @property
    def ranks_entries(self) -> bool:  # a block's layers share one layout: no per-layer allocation
        return False

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:  # PoD works per block (compress)
        raise NotImplementedError

    # ---- memory estimate (``kvcli profile --estimate``) ---------------------------------------
    def estimate_layers(
        self, shape: CacheShape, step: EstimateStep, default: list[LayerEstimate]
    ) -> list[LayerEstimate]:
        """Per-layer bytes at ``step``, replaying ``compress`` on entry counts (called for every
        moment of one estimate, in order).  Anchors are growing layers; members hold values
        and metadata for every entry, keys for head + tail only."""
        from ..cache.sizing import growing_layer

        if step.seen == step.chunk and not step.compressed:  # first moment of this estimate
            self.chosen_blocks = self.choose_blocks(shape.growing_indices, shape.config)
            self._counts = _BlockCounts()
        counts = self._counts
        if step.compressed:
            self._estimate_compress(counts, step.seen, step.budget.target(step.seen))
        else:
            counts.forward(step.chunk, self.n_sink)
        stats = self.needs_scores and not step.budget.is_full
        per_key = shape.kv_entry_bytes // 2  # one entry's keys (or values) over the KV heads
        out = list(default)
        for block in self.chosen_blocks:
            for j, idx in enumerate(block):
                layer = growing_layer(
                    shape,
                    idx,
                    counts.entries,
                    positions=counts.compressed,
                    counts=counts.compressed and self.stores_counts,
                    stats=stats,
                )
                out[idx] = replace(layer, keys=(counts.head + counts.tail) * per_key) if j else layer
        return out

    def _estimate_compress(self, counts: _BlockCounts, seen: int, target: int) -> None:
        """``compress`` on counts.  A squeeze rewrites a block holding more than ``n_sink``
        entries to head + distant + recent window = ``target`` entries (at least one distant
        slot).  Members keep ``min(tail, n_recent)`` own keys: their tail is a run of entries
        never compressed, and the window grows by at most a chunk per step, so whenever
        ``n_recent`` is below the tail the anchor holds exactly ``n_recent`` entries at or
        after the horizon (above it, at least the tail: nothing is dropped)."""
        n_recent, squeeze = self.proximal_window(seen, target, counts.entries)
        if squeeze and counts.entries > self.n_sink:
            counts.entries = max(target, self.n_sink + 1)
            counts.compressed = True
        counts.tail = min(counts.tail, n_recent)
