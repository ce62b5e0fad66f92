"""``kvcli calibrate``: JSD between growing layers' distant attention and PoD block grouping.

Tiny in-process models only (no embedded model): the divergences are checked against
transformers' eager attention, identical layers are built by copying weights (with the
layers in between silenced so both see the same input), and the profile written by the
CLI is the one ``make_method("pod")`` picks up.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kvcli import api
from kvcli.core.budget import Budget
from kvcli.core.errors import KvcliError
from kvcli.engine.engine import Engine
from kvcli.methods import make_method
from kvcli.methods.pod import calibration_path
from kvcli.profile.calibrate import LN2, calibrate, choose_blocks, jsd, measure, write_profile

from conftest import WORDS, IdTokenizer, save_word_llama, sharpen, tiny_gemma3, tiny_llama
from test_cli import assert_one_line_error, run_cli

SMALL = {"queries": 16, "recent": 48, "sinks": 4}  # 200 tokens leave 148 distant keys


def _ids(n: int = 200, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _consecutive_runs(blocks: list[list[int]], growing: list[int]) -> None:
    assert [i for b in blocks for i in b] == growing  # a partition, in order
    for b in blocks:
        assert b, "empty block"
        first = growing.index(b[0])
        assert b == growing[first : first + len(b)]


# ---- the divergence --------------------------------------------------------------------------------
def test_jsd_zero_symmetric_bounded():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 50, generator=gen) * 3, dim=-1)
    q = torch.softmax(torch.randn(6, 50, generator=gen) * 3, dim=-1)
    assert torch.allclose(jsd(p, p), torch.zeros(6), atol=1e-6)
    assert torch.allclose(jsd(p, q), jsd(q, p), atol=1e-7)
    d = jsd(p, q)
    assert (d > 0).all() and (d <= LN2).all()
    # Disjoint supports reach the bound; zeros in one distribution are fine (0 log 0 = 0).
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    a[:, :2], b[:, 2:] = 0.5, 0.5
    assert torch.allclose(jsd(a, b), torch.full((2,), LN2), atol=1e-6)
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    assert 0 < float(jsd(one_hot, torch.tensor([0.5, 0.5, 0.0]))) < LN2


# ---- grouping (pure) --------------------------------------------------------------------------------
def _matrix(n: int, consecutive: list[float], far: float = 0.6) -> list[list[float | None]]:
    m = [[None] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            v = consecutive[i] if j == i + 1 else far
            m[i][j] = m[j][i] = v
    return m


def test_choose_blocks_threshold_rule_uses_the_anchor():
    growing = [2, 5, 8, 11]
    m = _matrix(4, [0.1, 0.1, 0.5], far=0.6)
    # 5 joins 2 (0.1); 8 is close to 5 but far from the anchor 2 (0.6): a new block.
    assert choose_blocks(growing, m, threshold=0.3, max_block=0) == [[2, 5], [8], [11]]
    m[0][2] = m[2][0] = 0.2
    assert choose_blocks(growing, m, threshold=0.3, max_block=0) == [[2, 5, 8], [11]]
    assert choose_blocks(growing, m, threshold=0.3, max_block=2) == [[2, 5], [8], [11]]
    assert choose_blocks(growing, m, threshold=0.0, max_block=0) == [[2], [5], [8], [11]]
    assert choose_blocks(growing, m, threshold=LN2, max_block=0) == [growing]


def test_choose_blocks_count_rule_cuts_largest():
    growing = [0, 1, 2, 3, 4]
    m = _matrix(5, [0.05, 0.4, 0.1, 0.3])
    assert choose_blocks(growing, m, n_blocks=1) == [growing]
    assert choose_blocks(growing, m, n_blocks=2) == [[0, 1], [2, 3, 4]]
    assert choose_blocks(growing, m, n_blocks=3) == [[0, 1], [2, 3], [4]]
    assert choose_blocks(growing, m, n_blocks=5) == [[0], [1], [2], [3], [4]]
    with pytest.raises(KvcliError):
        choose_blocks(growing, m, n_blocks=6)


@pytest.mark.parametrize("seed", range(5))
def test_choose_blocks_always_partitions(seed):
    rng = torch.Generator().manual_seed(seed)
    growing = sorted(torch.randperm(30, generator=rng)[:7].tolist())
    m = _matrix(7, (torch.rand(6, generator=rng) * LN2).tolist(), far=float(torch.rand(1, generator=rng)) * LN2)
    for kw in ({"threshold": 0.3, "max_block": 0}, {"threshold": 0.5, "max_block": 3}, {"n_blocks": 3}):
        blocks = choose_blocks(growing, m, **kw)
        _consecutive_runs(blocks, growing)
        if kw.get("max_block"):
            assert max(map(len, blocks)) <= kw["max_block"]


# ---- measured on tiny models ------------------------------------------------------------------------
def _eager_reference(model, ids: torch.Tensor, layers: list[int], queries: int, recent: int, sinks: int):
    """Distant attention of the last ``queries`` positions from transformers' eager attention
    (the full matrix: fine for a tiny model), renormalised over the distant keys."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        out = ref(input_ids=ids.view(1, -1), output_attentions=True)
    t = ids.numel()
    dists, mass = {}, {}
    for idx in layers:
        a = out.attentions[idx][0, :, t - queries :].double()  # [Hq, W, T]
        d = a[..., sinks : t - recent]
        mass[idx] = float(d.sum(-1).mean())
        dists[idx] = d / d.sum(-1, keepdim=True)
    return dists, mass


@pytest.mark.parametrize("shape", ["gqa", "gemma3"])
def test_divergences_match_eager_attention(shape):
    factory = {"gqa": lambda: tiny_llama(num_kv_heads=2, layers=3), "gemma3": lambda: tiny_gemma3(layers=6)}[shape]
    model = sharpen(factory())
    ids = _ids(200)
    ref_model = copy.deepcopy(model)
    lm = api.wrap_model(model, IdTokenizer())
    each = measure(lm, ids, chunk_size=64, heads="each", **SMALL)
    group = measure(lm, ids, chunk_size=64, **SMALL)
    assert each.growing == group.growing == ([0, 1, 2] if shape == "gqa" else [1, 3, 5])
    assert group.distant_keys == 200 - 48 - 4
    dists, mass = _eager_reference(ref_model, ids, group.growing, **SMALL)
    hkv = model.config.num_key_value_heads
    for i, a in enumerate(group.growing):
        assert group.distant_mass[i] == pytest.approx(mass[a], abs=1e-4)
        for j, b in enumerate(group.growing):
            if i < j:
                expected = float(jsd(dists[a], dists[b]).mean())  # query head h against query head h
                assert each.matrix[i][j] == pytest.approx(expected, abs=1e-4)
                # group: the query heads of a KV head averaged first (GQA: consecutive heads share one)
                pa, pb = (dists[x].reshape(hkv, -1, *dists[x].shape[1:]).mean(1) for x in (a, b))
                assert group.matrix[i][j] == pytest.approx(float(jsd(pa, pb).mean()), abs=1e-4)
                assert group.matrix[j][i] == group.matrix[i][j]
    for cal in (each, group):
        assert all(0 < v <= LN2 for v in cal.consecutive)
    assert each.consecutive != group.consecutive


def _silence(layer) -> None:
    """The layer adds nothing to the residual stream (its output projections are zero)."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def _copy_attention(src, dst) -> None:
    """``dst`` computes the same queries and keys as ``src`` from the same input."""
    with torch.no_grad():
        dst.input_layernorm.load_state_dict(src.input_layernorm.state_dict())
        dst.self_attn.load_state_dict(src.self_attn.state_dict())


def test_identical_layers_grouped_dissimilar_split():
    """Layers 0 and 1 see the same input with the same attention weights; layer 2 is its own."""
    model = sharpen(tiny_llama(num_kv_heads=2, layers=3))
    layers = model.model.layers
    _silence(layers[0])
    _copy_attention(layers[0], layers[1])
    lm = api.wrap_model(model, IdTokenizer())
    ids = _ids(200)
    cal = calibrate(lm, ids, threshold=0.05, max_block=0, chunk_size=64, **SMALL)
    m = cal.matrix
    assert m[0][1] == pytest.approx(0.0, abs=1e-6)
    assert m[0][2] > 0.05 and m[1][2] > 0.05
    assert cal.blocks == [[0, 1], [2]]
    # The shared-key measure (layer 1 reading layer 0's keys) sees no distortion either.
    shared = calibrate(lm, ids, threshold=0.05, max_block=0, how="shared", chunk_size=64, **SMALL)
    assert shared.matrix[0][1] == pytest.approx(0.0, abs=1e-6) and shared.matrix[1][0] is None
    assert shared.matrix[1][2] > 0.05
    assert shared.blocks == [[0, 1], [2]]
    assert calibrate(lm, ids, threshold=0.05, heads="each", chunk_size=64, **SMALL).blocks == [[0, 1], [2]]
    # Exactly two blocks / one block cap give the same split / all singles.
    assert calibrate(lm, ids, n_blocks=2, chunk_size=64, **SMALL).blocks == [[0, 1], [2]]
    assert calibrate(lm, ids, threshold=0.05, max_block=1, chunk_size=64, **SMALL).blocks == [[0], [1], [2]]


def test_identical_full_layers_grouped_across_sliding_layers():
    """Gemma 3 shape: the full-attention layers 1 and 3 agree when layer 1 and the sliding
    layer 2 between them are silent and layer 3 copies layer 1's attention."""
    model = sharpen(tiny_gemma3(layers=6))
    layers = model.model.layers
    _silence(layers[1])
    _silence(layers[2])
    with torch.no_grad():
        layers[3].input_layernorm.load_state_dict(layers[1].input_layernorm.state_dict())
        layers[3].self_attn.load_state_dict(layers[1].self_attn.state_dict())
    lm = api.wrap_model(model, IdTokenizer())
    cal = calibrate(lm, _ids(200), threshold=0.05, max_block=0, chunk_size=64, **SMALL)
    assert cal.growing == [1, 3, 5]
    assert cal.matrix[0][1] == pytest.approx(0.0, abs=1e-6)
    assert cal.matrix[1][2] > 0.05
    assert cal.blocks == [[1, 3], [5]]


def test_blocks_partition_growing_layers(tiny_model):
    name, model = tiny_model
    lm = api.wrap_model(model, IdTokenizer())
    for kw in ({"threshold": 0.4, "max_block": 2}, {"threshold": LN2, "max_block": 0}, {"n_blocks": 1}):
        cal = calibrate(lm, _ids(200), chunk_size=64, **SMALL, **kw)
        _consecutive_runs(cal.blocks, cal.growing)
        # PoD's own validation accepts them.
        pod = make_method("pod", blocks=cal.blocks)
        assert pod.choose_blocks(cal.growing, model.config) == cal.blocks


def test_band_limits_pairs():
    lm = api.wrap_model(sharpen(tiny_llama(layers=4)), IdTokenizer())
    cal = calibrate(lm, _ids(200), max_block=2, chunk_size=64, **SMALL)
    m = cal.matrix
    assert all(m[i][i + 1] is not None for i in range(3))
    assert m[0][2] is None and m[0][3] is None and m[1][3] is None
    assert len(cal.profile("tiny")["jsd_pairs"]) == 3


def test_too_short_and_bad_settings():
    lm = api.wrap_model(tiny_llama(), IdTokenizer())
    with pytest.raises(KvcliError, match="needs at least"):
        measure(lm, _ids(60), **SMALL)
    with pytest.raises(KvcliError, match="recent window"):
        measure(lm, _ids(200), queries=64, recent=32, sinks=4)
    with pytest.raises(KvcliError, match="measure"):
        measure(lm, _ids(200), how="cosine", **SMALL)
    plain = tiny_llama()  # sdpa, not kvcli's attention
    with pytest.raises(KvcliError, match="kvcli's attention"):
        measure(plain, _ids(200), **SMALL)


# ---- the profile file ---------------------------------------------------------------------------------
def test_write_profile_is_atomic(tmp_path):
    path = tmp_path / "p.json"
    write_profile(path, {"blocks": [[1]]})
    write_profile(path, {"blocks": [[1, 3]]})
    assert json.loads(path.read_text()) == {"blocks": [[1, 3]]}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]  # no temporary file left
    with pytest.raises(TypeError):
        write_profile(path, {"blocks": object()})
    assert json.loads(path.read_text()) == {"blocks": [[1, 3]]}  # a failed write leaves the old file
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_profile_picked_up_by_pod(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path))
    model = sharpen(tiny_llama(num_kv_heads=2, layers=3))
    _silence(model.model.layers[0])
    _copy_attention(model.model.layers[0], model.model.layers[1])
    lm = api.wrap_model(model, IdTokenizer())
    cal = calibrate(lm, _ids(200), threshold=0.05, chunk_size=64, **SMALL)
    path = calibration_path(model.config)
    assert str(path).startswith(str(tmp_path))
    path.parent.mkdir(parents=True)
    write_profile(path, cal.profile("tiny"))
    method = make_method("pod")
    Engine(model, method, Budget(ratio=1.0))  # attach chooses the blocks
    assert method.chosen_blocks == [[0, 1], [2]]
    assert method.blocks_source == str(path)


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 3-layer Llama with a word-level tokenizer, saved like a hub model."""
    return save_word_llama(tmp_path_factory.mktemp("calib-llama"), layers=3, prepare=sharpen)


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))
    return lambda *args: run_cli(list(args), capfd, monkeypatch)


@pytest.fixture
def words_doc(tmp_path):
    path = tmp_path / "words.txt"
    gen = torch.Generator().manual_seed(1)
    path.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, 40, (400,), generator=gen)), encoding="utf-8")
    return path


TINY_FLAGS = ("--queries", "16", "--recent", "48", "--sinks", "4", "--chunk-size", "64")


def test_cli_writes_default_profile_that_pod_reads(cli, model_dir, words_doc, tmp_path):
    res = cli("calibrate", words_doc, "--model", model_dir, *TINY_FLAGS, "--quiet")
    assert res.code == 0, res.err
    lm = api.load_model(str(model_dir), device="cpu", quiet=True)
    path = calibration_path(lm.model.config)
    assert str(path).startswith(str(tmp_path / "cache")) and path.is_file()
    data = json.loads(path.read_text())
    assert data["method"] == "jsd" and data["tokens"] == 401  # BOS + 400 words
    assert data["growing_layers"] == [0, 1, 2] and len(data["jsd"]) == 2
    assert data["model"] == str(model_dir) and data["source"] == str(words_doc)
    _consecutive_runs(data["blocks"], [0, 1, 2])
    assert str(path) in res.out and "JSD" in res.out
    method = make_method("pod")
    Engine(lm.model, method, Budget(ratio=1.0))
    assert method.chosen_blocks == data["blocks"] and method.blocks_source == str(path)


def test_cli_output_json_and_blocks(cli, model_dir, words_doc, tmp_path):
    out = tmp_path / "profile.json"
    res = cli("calibrate", words_doc, "--model", model_dir, *TINY_FLAGS, "--output", out, "--blocks", "3", "--json")
    assert res.code == 0, res.err
    printed = json.loads(res.out)
    assert printed["path"] == str(out)
    data = json.loads(out.read_text())
    assert data["blocks"] == [[0], [1], [2]] and data["rule"] == "blocks"
    assert not (tmp_path / "cache" / "calibration").exists()  # --output: the default profile is untouched
    assert res.err.strip() == ""  # --json: no progress display


def test_cli_default_filler_text(cli, model_dir, tmp_path):
    """No FILE: generated filler text of --tokens tokens (a word-level tokenizer maps most
    of it to <unk>, which is fine for the plumbing)."""
    out = tmp_path / "p.json"
    res = cli("calibrate", "--model", model_dir, "--tokens", "300", *TINY_FLAGS, "--output", out, "--quiet")
    assert res.code == 0, res.err
    data = json.loads(out.read_text())
    assert data["tokens"] == 300 and data["source"].startswith("generated filler")


def test_cli_missing_file(cli, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_one_line_error(cli("calibrate", missing), str(missing), "no such file")


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--max-block", "-1"), "--max-block"),
        (("--blocks", "0"), "--blocks"),
        (("--threshold", "-0.1"), "--threshold"),
        (("--tokens", "0"), "--tokens"),
        (("--queries", "64", "--recent", "32"), "--recent"),
        (("--measure", "cosine"), "--measure"),
        (("--heads", "some"), "--heads"),
    ],
)
def test_cli_bad_options(cli, words_doc, args, needle):
    assert_one_line_error(cli("calibrate", words_doc, *args), needle)


def test_cli_output_in_missing_directory(cli, words_doc, tmp_path):
    target = tmp_path / "no" / "such" / "p.json"
    assert_one_line_error(cli("calibrate", words_doc, "--output", target), "--output", "does not exist")
    assert_one_line_error(cli("calibrate", words_doc, "--output", tmp_path), "--output", "directory")


def test_cli_text_too_short(cli, model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3 w4 w5", encoding="utf-8")
    assert_one_line_error(cli("calibrate", short, "--model", model_dir, *TINY_FLAGS, "--quiet"), "needs at least")


def test_cli_too_many_blocks(cli, model_dir, words_doc, tmp_path):
    res = cli(
        "calibrate",
        words_doc,
        "--model",
        model_dir,
        *TINY_FLAGS,
        "--blocks",
        "4",
        "--output",
        tmp_path / "p.json",
        "--quiet",
    )
    assert_one_line_error(res, "--blocks 4", "3 full-attention layers")
    assert not (tmp_path / "p.json").exists()
