"""KVMerger on hand-built tensors: sets, weights, exact budgets, accumulating counts."""

import pytest
import torch

from kvcli.cache import Clock, GrowingLayer
from kvcli.core.errors import KvcliError
from kvcli.methods import make_method


def make_layer(keys: torch.Tensor, values: torch.Tensor | None = None, scores=None) -> GrowingLayer:
    """A growing layer holding ``keys`` [H, n, D] at positions 0..n-1."""
    h, n, d = keys.shape
    clock = Clock()
    clock.positions = torch.arange(n)
    layer = GrowingLayer(clock, 0)
    layer.track_scores = True
    values = values if values is not None else torch.randn(h, n, d)
    layer.update(keys.unsqueeze(0).clone(), values.unsqueeze(0).clone())
    layer.scores = (scores if scores is not None else torch.ones(h, n)).unsqueeze(0).clone().float()
    return layer


def direction(i: int, d: int = 8) -> torch.Tensor:
    v = torch.zeros(d)
    v[i % d] = 1.0
    return v


def merger(**kw):
    base = dict(n_sink=0, recent=0.0, heavy=0.0)
    base.update(kw)
    return make_method("kvmerger", **base)


def test_sets_join_similar_neighbours_never_across_a_dissimilar_one():
    # entries 0-4 share one direction, 5 is orthogonal, 6-9 share another.
    keys = torch.stack([direction(0)] * 5 + [direction(3)] + [direction(5)] * 4).unsqueeze(0)
    keys = keys + 0.01 * torch.randn_like(keys)
    m = merger(fallback="evict")  # the threshold is a hard limit
    prot = torch.zeros(1, 10, dtype=torch.bool)
    sets = m.merging_sets(keys.unsqueeze(0), prot, n_merge=9)[0].tolist()
    assert sets == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
    # fallback="merge": the passing pairs still all merge first; only a budget that needs
    # more crosses the dissimilar entry (7 passing pairs, 8 merges asked)
    m = merger(fallback="merge")
    assert m.merging_sets(keys.unsqueeze(0), prot, n_merge=7)[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2, 2]
    crossed = m.merging_sets(keys.unsqueeze(0), prot, n_merge=8)[0].tolist()
    assert crossed in ([0] * 6 + [1] * 4, [0] * 5 + [1] * 5)


def test_protected_entries_are_never_merged():
    keys = torch.stack([direction(0)] * 10).unsqueeze(0)
    m = merger(n_sink=2, recent=0.5)
    prot = m.protected(torch.ones(1, 10), target=4)  # sinks 0,1 and recent 8,9
    assert prot[0].tolist() == [True, True] + [False] * 6 + [True, True]
    sets = m.merging_sets(keys.unsqueeze(0), prot, n_merge=6)[0].tolist()
    assert sets == [0, 1, 2, 2, 2, 2, 2, 2, 3, 4]


def test_most_similar_pairs_merge_first_when_budget_needs_few():
    keys = torch.stack(
        [
            direction(0),
            direction(0) * 0.9 + direction(1) * 0.45,
            direction(1) * 0.9 + direction(0) * 0.5,
            direction(2),
            direction(2),
        ]
    ).unsqueeze(0)
    m = merger(threshold=0.5)
    sets = m.merging_sets(keys.unsqueeze(0), torch.zeros(1, 5, dtype=torch.bool), n_merge=1)[0].tolist()
    assert sets == [0, 1, 2, 3, 3]  # only the identical pair (3, 4)


def test_score_fallback_merges_the_least_attended_dissimilar_pairs():
    # six mutually orthogonal keys: no pair passes the threshold, so the fallback decides;
    # entries 3 and 4 are the least attended, 0 and 1 the most similar pair
    keys = torch.stack(
        [direction(0), direction(0) * 0.5 + direction(1), direction(2), direction(3), direction(4), direction(5)]
    )
    keys = keys.unsqueeze(0).unsqueeze(0)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.05, 0.6]])
    free = torch.zeros(1, 6, dtype=torch.bool)
    by_cosine = merger(fallback="merge").merging_sets(keys, free, n_merge=1, scores=scores)[0].tolist()
    assert by_cosine == [0, 0, 1, 2, 3, 4]
    by_score = merger(fallback="score").merging_sets(keys, free, n_merge=1, scores=scores)[0].tolist()
    assert by_score == [0, 1, 2, 3, 3, 4]
    with pytest.raises(KvcliError, match="scores"):
        merger(fallback="score").merging_sets(keys, free, n_merge=1)


@pytest.mark.parametrize("value_mode", ["bias", "scale"])
def test_weights_follow_the_gaussian_kernel_formula(value_mode):
    torch.manual_seed(0)
    base = torch.randn(8)
    keys = torch.stack([base + 0.3 * torch.randn(8) for _ in range(4)]).unsqueeze(0)  # one set of 4
    values = torch.randn(1, 4, 8)
    scores = torch.tensor([[0.1, 0.7, 0.2, 0.05]])  # pivot = entry 1
    layer = make_layer(keys, values, scores)
    m = merger(threshold=-1.0, sigma=2.0, value_mode=value_mode)
    m.compress_layer(layer, target=1)
    k = keys[0]
    g = torch.exp(-((k[1] - k) ** 2).sum(-1) / (2 * 2.0**2))
    w = g / g.sum()
    torch.testing.assert_close(layer.keys[0, 0, 0], (w[:, None] * k).sum(0))
    expected_v = (w[:, None] * values[0]).sum(0) * (4 if value_mode == "scale" else 1)
    torch.testing.assert_close(layer.values[0, 0, 0], expected_v)
    assert layer.key_positions()[0, 0].tolist() == [1]  # the pivot's slot
    assert layer.entry_counts()[0, 0].tolist() == [4.0]
    assert m.count_bias == (value_mode == "bias")


@pytest.mark.parametrize("fallback", ["merge", "score", "evict"])
@pytest.mark.parametrize("similar", [True, False])
def test_budget_is_exact(similar, fallback):
    torch.manual_seed(1)
    n = 40
    keys = (torch.stack([direction(i // 5) for i in range(n)]) if similar else torch.randn(n, 8)).unsqueeze(0)
    layer = make_layer(keys + 0.01 * torch.randn_like(keys), scores=torch.rand(1, n))
    m = merger(n_sink=2, recent=0.2, fallback=fallback)  # protects 2 + 3 entries: 27 similar pairs remain, 27 needed
    m.compress_layer(layer, target=13)
    assert layer.length == 13 and layer.keys.shape[2] == 13
    counts = layer.entry_counts()[0, 0]
    if similar or fallback in ("merge", "score"):
        assert counts.sum().item() == n  # nothing evicted: every token is represented
    else:
        assert counts.sum().item() < n  # dissimilar keys: fell back to eviction
    pos = layer.key_positions()[0, 0]
    assert torch.all(pos[1:] > pos[:-1])  # slots stay in position order


def test_counts_accumulate_across_repeated_merges():
    keys = torch.stack([direction(0)] * 30).unsqueeze(0) + 0.001 * torch.randn(1, 30, 8)
    layer = make_layer(keys)
    m = merger()
    m.compress_layer(layer, target=10)
    assert layer.entry_counts().sum().item() == 30
    # more tokens arrive, then merge again: earlier merged entries merge again
    layer.clock.positions = torch.arange(30, 40)
    layer.update(direction(0).expand(1, 1, 10, 8).clone(), torch.randn(1, 1, 10, 8))
    m.compress_layer(layer, target=5)
    counts = layer.entry_counts()[0, 0]
    assert layer.length == 5 and counts.sum().item() == 40 and counts.max().item() > 10


def test_heavy_hitters_rank_by_pooled_scores_when_asked():
    # one peak at entry 6 of 12; two heavy hitters
    scores = torch.zeros(1, 12)
    scores[0, 6] = 1.0
    scores[0, 2] = 0.5
    raw = merger(heavy=0.5).protected(scores, target=4)[0]  # 2 heavy hitters: the two peaks
    assert raw.nonzero().flatten().tolist() == [2, 6]
    # pooled over 1 back and 1 + 2 ahead: entries 3..7 reach the peak at 6 and outrank the
    # lesser peak at 2 (0.5), so both heavy hitters lie in the peak's span
    pooled = merger(heavy=0.5, kernel=3, ahead=2).protected(scores, target=4)[0]
    chosen = set(pooled.nonzero().flatten().tolist())
    assert len(chosen) == 2 and chosen <= {3, 4, 5, 6, 7}
    assert merger(heavy=0.5, kernel=1, ahead=0).protected(scores, target=4)[0].tolist() == raw.tolist()


def test_invalid_options_are_clear_errors():
    for bad in (
        {"threshold": 2},
        {"sigma": 0},
        {"recent": 0.9, "heavy": 0.5},
        {"value_mode": "x"},
        {"kernel": 4},
        {"kernel": 0},
        {"ahead": -1},
    ):
        with pytest.raises(KvcliError):
            make_method("kvmerger", **bad)


# ---- sets="kept": the best-scored entries survive, their similar neighbours merge into them ----


def test_kept_sets_survivors_are_the_best_scored_and_chained_neighbours_join_them():
    # runs of alike keys: 0-2, 3, 4-7, 8, 9-11; peaks at 1, 7 and 11
    runs = [0, 0, 0, 1, 2, 2, 2, 2, 3, 4, 4, 4]
    keys = torch.stack([3 * direction(i) for i in runs]).unsqueeze(0).unsqueeze(0)
    scores = torch.tensor([[0.1, 0.9, 0.1, 0.2, 0.1, 0.1, 0.1, 0.8, 0.05, 0.1, 0.1, 0.7]])
    members, set_ids, pivots = merger(sets="kept").kept_sets(keys, scores, target=3)
    # 3 and 8 are alike to no survivor's run: evicted; the others join their run's survivor
    assert members.tolist() == [True] * 3 + [False] + [True] * 4 + [False] + [True] * 3
    assert set_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert members.nonzero().flatten()[pivots].tolist() == [1, 7, 11]


def test_kept_sets_hold_neighbours_alike_to_the_survivor_not_a_drifting_chain():
    # keys turn by 0.3 rad a step: each is alike to the next (cos 0.96) but only the two
    # nearest are alike to the survivor at 0 (cos 0.96, 0.83; the third 0.62 < 0.75)
    angles = 0.3 * torch.arange(8.0)
    keys = torch.zeros(1, 1, 8, 8)
    keys[0, 0, :, 0], keys[0, 0, :, 1] = angles.cos(), angles.sin()
    scores = torch.zeros(1, 8)
    scores[0, 0] = 1.0
    members, set_ids, _ = merger(sets="kept").kept_sets(keys, scores, target=1)
    assert members.tolist() == [True, True, True] + [False] * 5
    assert set_ids.tolist() == [0, 0, 0]


def test_kept_sets_split_a_run_between_two_survivors_at_its_middle():
    keys = (3 * direction(0)).expand(1, 1, 9, 8).clone()  # one run of alike keys
    scores = torch.zeros(1, 9)
    scores[0, 1] = scores[0, 7] = 1.0
    _, set_ids, _ = merger(sets="kept").kept_sets(keys, scores, target=2)
    # 0-4 are nearer 1 (4 is as near to both and stays with the left), 5-8 nearer 7
    assert set_ids.tolist() == [0] * 5 + [1] * 4


def test_kept_sets_compress_to_exactly_the_target_with_summed_counts_and_scores():
    runs = [0, 0, 0, 1, 2, 2, 2, 2, 3, 4, 4, 4]
    keys = torch.stack([3 * direction(i) for i in runs]).unsqueeze(0)
    keys = keys + 0.05 * torch.randn_like(keys)
    scores = torch.tensor([[0.1, 0.9, 0.1, 0.2, 0.1, 0.1, 0.1, 0.8, 0.05, 0.1, 0.1, 0.7]])
    layer = make_layer(keys, scores=scores)
    values = layer.values[0, 0, :12].clone()
    merger(sets="kept", sigma=1.0).compress_layer(layer, 3)
    assert layer.length == 3 and layer.keys.shape[2] == 3 and layer.values.shape[2] == 3
    assert layer.key_positions()[0, 0].tolist() == [1, 7, 11]
    assert layer.entry_counts()[0, 0].tolist() == [3.0, 4.0, 3.0]
    assert torch.allclose(layer.scores[0, 0], torch.tensor([0.9, 0.8, 0.7]))  # a set scores as its best member
    # the survivor's value is the Gaussian-weighted mean of its set (evicted 3 and 8 take no part)
    k = keys[0]
    for s, (lo, hi, piv) in enumerate([(0, 3, 1), (4, 8, 7), (9, 12, 11)]):
        g = torch.exp(-(k[lo:hi] - k[piv]).square().sum(-1) / 2.0)
        want = (g.unsqueeze(-1) * values[lo:hi]).sum(0) / g.sum()
        assert torch.allclose(layer.values[0, 0, s], want, atol=1e-5)


def test_kept_sets_without_alike_neighbours_keep_what_snapkv_keeps():
    """An independent reference: with no pair alike enough to merge (threshold 1), one KV head,
    the same pool and as many recent entries, the survivors are snapkv's, bit for bit."""
    torch.manual_seed(0)
    n, target = 40, 12
    keys, values = torch.randn(1, n, 8), torch.randn(1, n, 8)
    scores = torch.rand(1, n)
    a = make_layer(keys, values, scores)
    b = make_layer(keys, values, scores)
    a.obs = b.obs = scores.unsqueeze(0).clone()  # snapkv ranks the observation window's attention
    merger(sets="kept", threshold=1.0, recent=0.25, kernel=5, ahead=2, n_sink=2).compress_layer(a, target)
    make_method("snapkv", window=3, kernel=5, ahead=2, n_sink=2).compress_layer(b, target)
    assert a.key_positions().tolist() == b.key_positions().tolist()
    assert torch.equal(a.values[:, :, : a.length], b.values[:, :, : b.length])
    assert torch.equal(a.keys[:, :, : a.length], b.keys[:, :, : b.length])
    assert a.entry_counts().eq(1).all()


def test_sets_is_a_checked_option():
    with pytest.raises(KvcliError, match="sets"):
        make_method("kvmerger", sets="nearby")
