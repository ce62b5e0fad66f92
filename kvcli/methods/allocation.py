"""How a budget is split among the growing layers after each chunk.

* ``uniform``: every layer keeps the same number of entries (the budget's target).
* ``global``: the entries of all layers compete in one ranking, as KVzip does: the
  ``target x layers`` entries a method ranks highest are kept, wherever they are, so a layer
  whose entries matter keeps more than one whose entries do not.  Within a layer all KV heads
  keep the same number of entries (the cache stores a layer's heads as one tensor), so a
  layer's share is its (head, entry) pairs among the winners divided by its heads.  Every
  layer keeps at least ``floor`` entries (its sinks and protected window), and the total is
  exact: ``target x layers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def global_targets(importance: list[torch.Tensor], target: int, floor: int) -> list[int]:
    """Entries each layer keeps: ``importance[l]`` is ``[B, H, n_l]`` (what the method ranks
    entries by, comparable across layers); ``target`` is the per-layer budget."""
    import torch

    lengths = [int(imp.shape[-1]) for imp in importance]
    heads = int(importance[0].shape[1])
    total = target * len(importance)
    if sum(lengths) <= total:
        return lengths
    ranked = []
    for imp, n in zip(importance, lengths, strict=True):
        imp = imp.float().clone()
        # Each head's best ``floor`` entries win whatever their rank: every layer keeps its floor.
        imp.scatter_(-1, torch.topk(imp, min(floor, n), dim=-1).indices, float("inf"))
        ranked.append(imp.reshape(-1))
    owner = torch.repeat_interleave(torch.arange(len(importance)), torch.tensor([heads * n for n in lengths]))
    won = torch.bincount(owner[torch.topk(torch.cat(ranked), total * heads).indices], minlength=len(importance))
    share = won.double() / heads
    keep = share.floor().long()
    # Round to an exact total: the largest remainders get the leftover entries (a remainder
    # means the layer is below its length, so one more fits).
    leftover = total - int(keep.sum())
    if leftover > 0:
        keep[torch.argsort(share - keep.double(), descending=True)[:leftover]] += 1
    return [int(x) for x in keep]
