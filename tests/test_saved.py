"""Saved contexts (``.kvc``): answers after save and load are the answers given right after
prefill, for every method; files from another model, dtype or format version, and files
cut short or replaced, are one-line errors; nothing is overwritten without ``force``."""

from __future__ import annotations

import json

import pytest
import torch

from kvcli import api
from kvcli.core import kvcfile
from kvcli.core.errors import KvcliError
from kvcli.methods import Method, method_names

from conftest import IdTokenizer, sharpen, tiny_gemma3, tiny_llama

DOC, CHUNK, BUDGET = 64, 32, "0.5"
POD_SMALL = dict(n_sink=4, recent_min=8, recent=0.05)  # a proximal window far shorter than the document
MODELS = {
    "llama-gqa": lambda seed=0: tiny_llama(num_kv_heads=2, layers=2, seed=seed),  # PoD block [0, 1]
    "gemma3": lambda seed=0: tiny_gemma3(layers=4, seed=seed),  # sliding layers 0, 2; growing 1, 3: PoD block [1, 3]
}


@pytest.fixture(autouse=True)
def no_calibration_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def lms():
    return {name: api.wrap_model(sharpen(make()), IdTokenizer()) for name, make in MODELS.items()}


def doc_ids(n: int = DOC, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def prefill(lm, method: str = "snapkv", budget: str = BUDGET, scoring: str = "window", n: int = DOC):
    options = POD_SMALL if method.startswith("pod") else None
    return api.prefill(
        lm,
        doc_ids(n),
        method=method,
        budget=budget,
        chunk_size=CHUNK,
        raw=True,
        method_options=options,
        scoring=scoring,
    )


def greedy(ctx, n: int = 6) -> list[int]:
    ctx._eos = lambda: set()  # raw ids: a fixed number of tokens
    return ctx.generate_ids([5, 6, 7], n)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", method_names())
def test_answers_after_load_are_the_answers_after_prefill(lms, tmp_path, model, method):
    lm = lms[model]
    ctx = prefill(lm, method)
    before = greedy(ctx)
    saved = ctx.save(tmp_path / "doc.kvc")
    loaded = api.load_context(lm, tmp_path / "doc.kvc")
    assert greedy(loaded) == before
    assert greedy(loaded) == before  # the loaded context rolls back after each answer, as the original does
    assert loaded.report().kv_bytes == ctx.report().kv_bytes == saved.kv_bytes
    assert loaded.report().method == ctx.report().method
    assert loaded.report().method_options == ctx.report().method_options  # PoD: the same blocks
    assert loaded.engine.cache.seen == ctx.engine.cache.seen == DOC
    # the file is the cache plus the logits and the header: close to kv_bytes
    logits = lm.model.config.vocab_size * 4
    assert saved.kv_bytes + logits < saved.file_bytes < saved.kv_bytes + logits + 16_384


def test_recon_scoring_and_asking_before_saving(lms, tmp_path):
    """Questions asked before the save leave nothing behind; the default scoring (recon) is saved by name."""
    lm = lms["llama-gqa"]
    ctx = prefill(lm, "kvmerger", scoring="recon")
    first = greedy(ctx)
    ctx.save(tmp_path / "a.kvc")
    loaded = api.load_context(lm, tmp_path / "a.kvc")
    assert greedy(loaded) == first
    assert loaded.report().scoring == "recon"
    counts = [layer.counts for layer in loaded.engine.cache.growing_layers]
    assert all(c is not None and float(c.max()) > 1 for c in counts)  # merge counts came back


def test_header_says_what_the_context_is(lms, tmp_path):
    lm = lms["gemma3"]
    ctx = prefill(lm, "pod+kvmerger")
    ctx.save(tmp_path / "doc.kvc")
    saved, _ = kvcfile.read(tmp_path / "doc.kvc")
    h = saved.header
    assert set(kvcfile.HEADER_FIELDS) <= set(h)
    assert (h["format_version"], h["method"], h["budget"], h["dtype"]) == (1, "pod+kvmerger", "0.5:uniform", "float32")
    assert h["context_tokens"] == DOC and h["sources"][0]["tokens"] == DOC
    # a budget written without its allocation (before "heads" became the default) meant uniform
    from kvcli.api.saved import budget_from

    assert str(budget_from(saved)) == "0.5:uniform"
    h["budget"] = "0.5"
    assert budget_from(saved).allocation == "uniform"
    assert h["method_options"]["blocks"] == [[1, 3]]
    assert [layer["kind"] for layer in h["layers"]] == ["window", "growing", "window", "shared"]
    assert sum(saved.layer_bytes()) == h["kv_bytes"]  # every byte of the cache, nothing else per layer


def test_another_model_is_refused(lms, tmp_path):
    lm = lms["llama-gqa"]
    prefill(lm).save(tmp_path / "doc.kvc")
    other = api.wrap_model(sharpen(MODELS["llama-gqa"](seed=1)), IdTokenizer())  # same shapes, other weights
    with pytest.raises(KvcliError, match="another model.*weights"):
        api.load_context(other, tmp_path / "doc.kvc")
    with pytest.raises(KvcliError, match="another model.*config"):
        api.load_context(lms["gemma3"], tmp_path / "doc.kvc")


def test_another_dtype_is_refused(lms, tmp_path):
    prefill(lms["llama-gqa"]).save(tmp_path / "doc.kvc")
    half = api.wrap_model(sharpen(MODELS["llama-gqa"]()).to(torch.bfloat16), IdTokenizer())
    with pytest.raises(KvcliError, match="saved in float32.*bfloat16"):
        api.load_context(half, tmp_path / "doc.kvc")


def _rewrite_header(path, change, sign: bool = True) -> None:
    """Change kvcli's header and sign it again (a forger who knows the format)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    header = json.loads(raw["__metadata__"]["kvcli"])
    change(header)
    if sign:
        _, tensors, start = kvcfile._table(data, "x")
        header["checksum"] = kvcfile.checksum(header, tensors, memoryview(data)[start:])
    raw["__metadata__"]["kvcli"] = json.dumps(header)
    text = json.dumps(raw).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def test_another_format_version_is_refused(lms, tmp_path):
    path = tmp_path / "doc.kvc"
    prefill(lms["llama-gqa"]).save(path)
    _rewrite_header(path, lambda h: h.update(format_version=2))
    with pytest.raises(KvcliError, match="format version 2; this kvcli reads version 1"):
        api.load_context(lms["llama-gqa"], path)


@pytest.mark.parametrize("field", ["model", "layers", "checksum", "template", "budget"])
def test_a_missing_header_field_is_refused(lms, tmp_path, field):
    path = tmp_path / "doc.kvc"
    prefill(lms["llama-gqa"]).save(path)
    _rewrite_header(path, lambda h: h.pop(field), sign=field != "checksum")
    with pytest.raises(KvcliError, match=f"'{field}' is missing"):
        api.load_context(lms["llama-gqa"], path)


def test_truncated_and_corrupted_files_are_refused(lms, tmp_path):
    path = tmp_path / "doc.kvc"
    prefill(lms["llama-gqa"]).save(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.kvc"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(KvcliError, match="truncated"):
        api.load_context(lms["llama-gqa"], cut)
    flipped = bytearray(data)
    flipped[-1000] ^= 0x10  # a bit of a key or value
    bad = tmp_path / "bad.kvc"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(KvcliError, match="checksum mismatch"):
        api.load_context(lms["llama-gqa"], bad)


def test_a_document_is_not_a_saved_context(lms, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("plain text\n")
    with pytest.raises(KvcliError, match="not a safetensors file|not a usable kvcli context"):
        api.load_context(lms["llama-gqa"], doc)
    assert not kvcfile.looks_saved(doc)


def test_nothing_is_replaced_without_force(lms, tmp_path):
    path = tmp_path / "doc.kvc"
    path.write_bytes(b"precious")
    ctx = prefill(lms["llama-gqa"])
    with pytest.raises(KvcliError, match="exists"):
        ctx.save(path)
    assert path.read_bytes() == b"precious"
    ctx.save(path, force=True)
    assert api.load_context(lms["llama-gqa"], path).context_tokens == DOC
    assert [p.name for p in tmp_path.iterdir()] == ["doc.kvc"]  # no temporary file left behind


def test_append_continues_at_the_next_positions_under_the_budget(lms, tmp_path):
    lm = lms["llama-gqa"]
    ctx = prefill(lm, "snapkv", budget="0.5")
    ctx.save(tmp_path / "doc.kvc")
    loaded = api.load_context(lm, tmp_path / "doc.kvc")
    added = api.append_document(loaded, "".join(chr(40 + i % 50) for i in range(64)))
    assert added == 66  # "\n\n" + 64 characters, one id each
    total = DOC + added
    assert loaded.context_tokens == loaded.engine.cache.seen == total
    for layer in loaded.engine.cache.growing_layers:
        pos = layer.key_positions()[0, 0]
        assert layer.length <= -(-total // 2) + CHUNK  # the budget, give or take the last chunk's rounding
        assert int(pos.max()) == total - 1 and int(pos.min()) == 0  # the newest entry, and the sinks
    loaded.save(tmp_path / "both.kvc")
    again = api.load_context(lm, tmp_path / "both.kvc")
    assert greedy(again) == greedy(loaded)
    assert [s["tokens"] for s in again.sources] == [DOC, added]


@pytest.mark.slow
def test_embedded_model_answers_the_same_from_a_kvc(tmp_path):
    """The real model (Gemma 3 270M, sliding layers), the example report, snapkv at 0.5 with
    reconstruction scoring: the answer from the saved context is the answer after prefill."""
    from pathlib import Path

    lm = api.load_model(quiet=True)
    doc = api.open_document(str(Path(__file__).resolve().parents[1] / "examples" / "lighthouse_report.md"))
    ctx = api.prefill(lm, doc, method="snapkv", budget="0.5")
    question = "In what year was the Tessaly Rock Lighthouse built?"
    before = ctx.ask(question, max_new_tokens=12).tokens
    saved = ctx.save(tmp_path / "report.kvc")
    loaded = api.load_context(lm, tmp_path / "report.kvc")
    assert loaded.ask(question, max_new_tokens=12).tokens == before
    logits = lm.model.get_output_embeddings().weight.shape[0] * 4
    assert saved.kv_bytes < saved.file_bytes < saved.kv_bytes + logits + 65_536


def test_a_file_written_before_snapkv_had_pool_reads_as_avg(lms, tmp_path):
    """snapkv always pooled by average before ``pool`` became an option (default max): a
    file that does not name it must go on compressing (``append``) as it was made."""
    path = tmp_path / "doc.kvc"
    prefill(lms["llama-gqa"]).save(path)
    assert api.load_context(lms["llama-gqa"], path).engine.method.pool == "max"
    _rewrite_header(path, lambda h: [h["method_options"].pop(k) for k in ("pool", "ahead")])
    assert api.load_context(lms["llama-gqa"], path).engine.method.pool == "avg"
    assert api.load_context(lms["llama-gqa"], path).engine.method.ahead == 0
    centred = tmp_path / "centred.kvc"  # written with max pooling, before ``ahead``
    prefill(lms["llama-gqa"]).save(centred)
    assert api.load_context(lms["llama-gqa"], centred).engine.method.ahead == 2
    _rewrite_header(centred, lambda h: h["method_options"].pop("ahead"))
    loaded = api.load_context(lms["llama-gqa"], centred).engine.method
    assert (loaded.pool, loaded.ahead) == ("max", 0)
    inner = tmp_path / "pod.kvc"
    prefill(lms["llama-gqa"], method="pod+snapkv").save(inner)
    _rewrite_header(inner, lambda h: [h["method_options"]["inner"].pop(k) for k in ("pool", "ahead")])
    assert api.load_context(lms["llama-gqa"], inner).engine.method.inner.pool == "avg"


def _kept(ctx) -> list[torch.Tensor]:
    return [layer.key_positions() for layer in ctx.engine.cache.growing_layers]


def test_a_reloaded_context_goes_on_with_relatives_history(lms, tmp_path, monkeypatch):
    """snapkv's ``relative`` divides each head's scores by their mean over every entry it has
    ranked, evicted ones included: the file keeps what was evicted, so appending to the
    reloaded context keeps exactly what appending to the one in memory keeps; dropping the
    history (a file written before it was kept) keeps other entries here."""
    lm = lms["llama-gqa"]
    more = "".join(chr(40 + i * 7 % 50) for i in range(4 * CHUNK))
    live = prefill(lm, "snapkv", n=3 * CHUNK)
    history = live.engine.method.ranked_history(live.engine.cache)
    assert str(live.engine.budget).endswith(":relative") and history is not None and all(history.counts.values())
    live.save(tmp_path / "doc.kvc")
    loaded = api.load_context(lm, tmp_path / "doc.kvc")
    again = loaded.engine.method.ranked_history(loaded.engine.cache)
    assert again is not None and again.counts == history.counts
    assert all(torch.equal(again.sums[k], history.sums[k]) for k in history.sums)
    monkeypatch.setattr(Method, "resume_ranked", lambda self, cache, ranked: None)
    fresh = api.load_context(lm, tmp_path / "doc.kvc")
    assert fresh.engine.method.ranked_history(fresh.engine.cache) is None
    for ctx in (live, loaded, fresh):
        api.append_document(ctx, more)
    assert all(torch.equal(a, b) for a, b in zip(_kept(live), _kept(loaded), strict=True))
    assert greedy(loaded) == greedy(live)
    assert not all(torch.equal(a, b) for a, b in zip(_kept(live), _kept(fresh), strict=True))


def test_a_history_that_does_not_fit_is_a_one_line_error(lms, tmp_path):
    path = tmp_path / "doc.kvc"
    prefill(lms["llama-gqa"], "snapkv", n=3 * CHUNK).save(path)
    header = kvcfile.read(path)[0].header
    growing = api.load_context(lms["llama-gqa"], path).engine.cache.growing_layers
    assert set(header["ranked"]) == {str(layer.layer_idx) for layer in growing}
    for change, why in (
        (lambda h: h.update(ranked={"x": 1}), "must map layers to counts"),
        (lambda h: h.update(ranked={**h["ranked"], "7": 3}), "does not match its tensors"),
        (lambda h: h.pop("ranked"), "does not match its tensors"),
    ):
        bad = tmp_path / "bad.kvc"
        bad.write_bytes(path.read_bytes())
        _rewrite_header(bad, change)
        with pytest.raises(KvcliError, match=why):
            api.load_context(lms["llama-gqa"], bad)
