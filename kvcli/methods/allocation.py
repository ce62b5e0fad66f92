"""How a budget is split among the growing layers after each chunk.

* ``uniform``: every layer keeps the same number of entries (the budget's target).
* ``global``: the entries of all layers compete in one ranking, as KVzip does: the
  ``target x layers`` entries a method ranks highest are kept, wherever they are, so a layer
  whose entries matter keeps more than one whose entries do not.  Within a layer all KV heads
  keep the same number of entries (the cache stores a layer's heads as one tensor), so a
  layer's share is its (head, entry) pairs among the winners divided by its heads.
* ``heads``: the same ranking of (layer, head, entry), but a layer keeps as many entries as
  its *neediest* head won (every head of the layer then keeps that many, its best ones).
  KVzip lets each head keep its own count; kvcli's heads share a layer's length, so this is
  the closest layout that is still physical: a head that needs every entry (a copying head)
  gets them, and the other heads of its layer fill the same room with their best entries.
* ``relative``: ``heads``, with each head's scores divided by their mean first, so an entry
  competes on how far it stands out within its head, not on the size of the head's
  attention.  Reconstruction attention is diffuse in some layers (Gemma 3's last global
  layer: snapkv's pooled scores have a median of 0.22 there, 0.90 in its first), and ranked
  raw such a layer keeps only its sinks and window; divided by its mean, its peaks compete
  with the other layers' peaks, and a head that copies the context (every entry near its
  mean) still keeps much of its layer.  Measured on both embedded models (docs/scoring.md):
  snapkv's allocation under ``auto`` (it gains on both); kvmerger loses with it on SmolLM2
  and keeps ``heads``.

For ``global``, ``heads`` and ``relative`` every layer keeps at least ``floor`` entries (its
sinks and protected window), and the total is exact: ``target x layers``.

``relative`` divides by the mean over every entry the head has ranked, the evicted ones
included (``Ranked``), not by the mean of what it still holds: after each chunk a layer
keeps its best entries, so the mean of what it holds rises with every compression, most in
a layer whose scores are mostly near zero with a few peaks (Gemma 3's last global layer),
and that layer's entries shrank against the others' chunk after chunk.  Measured on Gemma
3 at 8K and 0.35 (one prefill, snapkv with reconstruction): its three growing layers kept
4,843 / 2,237 / 1,524 entries, where one ranking of the same scores over the whole document
gives 2,962 / 2,362 / 3,280 (docs/scoring.md, "The relative allocation's mean").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def global_targets(
    importance: list[torch.Tensor],
    target: int,
    floor: int,
    allocation: str = "global",
    means: list[torch.Tensor] | None = None,
) -> list[int]:
    """Entries each layer keeps under ``allocation`` (``global``, ``heads`` or ``relative``,
    as the module says): ``importance[l]`` is ``[B, H, n_l]`` (what the method ranks entries
    by, comparable across layers); ``target`` is the per-layer budget.  ``means[l]``
    (``[B, H, 1]``, ``relative`` only) is what each head's scores are divided by; by default
    the mean of the entries the layer holds (``Method.compress`` passes the mean over every
    entry the head has ranked, evicted ones included: ``Ranked``)."""
    import torch

    lengths = [int(imp.shape[-1]) for imp in importance]
    heads = int(importance[0].shape[1])
    total = target * len(importance)
    if sum(lengths) <= total:
        return lengths
    ranked = []
    for i, (imp, n) in enumerate(zip(importance, lengths, strict=True)):
        imp = imp.float().clone()
        if allocation == "relative":  # a head whose scores are all zero stays all zero
            mean = imp.mean(dim=-1, keepdim=True) if means is None else means[i].float()
            imp /= mean.clamp_min(torch.finfo(imp.dtype).tiny)
        # Each head's best ``floor`` entries win whatever their rank: every layer keeps its floor.
        imp.scatter_(-1, torch.topk(imp, min(floor, n), dim=-1).indices, float("inf"))
        ranked.append(imp.reshape(-1))
    if allocation != "global":  # heads, relative: a layer keeps its neediest head's count
        return _max_share(torch.cat(ranked), lengths, heads, total)
    owner = torch.repeat_interleave(torch.arange(len(importance)), torch.tensor([heads * n for n in lengths]))
    won = torch.bincount(owner[torch.topk(torch.cat(ranked), total * heads).indices], minlength=len(importance))
    mean = won.double() / heads
    keep = mean.floor().long()
    # Round to an exact total: the largest remainders get the leftover entries (a remainder
    # means the layer is below its length, so one more fits).
    leftover = total - int(keep.sum())
    if leftover > 0:
        keep[torch.argsort(mean - keep.double(), descending=True)[:leftover]] += 1
    return [int(x) for x in keep]


def _max_share(scores: torch.Tensor, lengths: list[int], heads: int, total: int) -> list[int]:
    """Per-head global ranking, a layer keeping its neediest head's count: the largest number
    of global winners whose per-layer maxima fit ``total``."""
    import torch

    n_layers = len(lengths)
    rows = torch.repeat_interleave(
        torch.arange(n_layers * heads), torch.tensor([n for n in lengths for _ in range(heads)])
    )
    order = rows[torch.argsort(scores, descending=True, stable=True)]

    def keep_for(w: int) -> torch.Tensor:
        return torch.bincount(order[:w], minlength=n_layers * heads).view(n_layers, heads).amax(dim=1)

    lo, hi = 0, int(order.numel())
    while lo < hi:  # the largest w whose layer maxima sum to at most total
        mid = (lo + hi + 1) // 2
        if int(keep_for(mid).sum()) <= total:
            lo = mid
        else:
            hi = mid - 1
    # Exact: one more winner raises at most one head's count, so at most one layer's maximum,
    # by one; the largest w within ``total`` therefore reaches it (the caller returned early
    # when every entry fits).
    return [int(x) for x in keep_for(lo)]


class Ranked:
    """What each layer's heads have ranked and evicted, for ``relative``'s means: the sum of
    the evicted entries' scores (``[B, H, 1]``, as ranked when they left) and their count.
    One per cache (``Method.compress``); a saved context keeps it (``kvcli.api.saved``), so
    a reloaded one goes on with the same means."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def means(self, keys: list[int], importance: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each head's mean score over the entries layer ``keys[l]`` holds and has evicted."""
        out = []
        for key, imp in zip(keys, importance, strict=True):
            total = imp.float().sum(dim=-1, keepdim=True)
            if key in self.sums:
                total = total + self.sums[key]
            out.append(total / (imp.shape[-1] + self.counts.get(key, 0)))
        return out

    def evicted(self, key: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Layer ``key`` went from entries scored ``before`` to entries scored ``after``
        (``[B, H, n]`` each): what left is added to its sums (merged entries count as evicted
        less what their survivor now scores)."""
        left = (before.float().sum(dim=-1, keepdim=True) - after.float().sum(dim=-1, keepdim=True)).clamp_min(0)
        self.sums[key] = self.sums[key] + left if key in self.sums else left
        self.counts[key] = self.counts.get(key, 0) + before.shape[-1] - after.shape[-1]
