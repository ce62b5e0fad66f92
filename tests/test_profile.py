"""``kvcli profile``: reported KV bytes are the cache's tensors; the estimate equals them."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from kvcli import api
from kvcli.cache.sizing import cache_shape
from kvcli.cli.app import app
from kvcli.core.errors import KvcliError
from kvcli.methods import method_names
from kvcli.profile import profile as prof
from kvcli.profile.estimate import estimate_kv_bytes, load_config

from conftest import IdTokenizer, tiny_gemma3, tiny_llama

runner = CliRunner()
SHAPES = {"gqa": lambda: tiny_llama(2), "mqa": lambda: tiny_llama(1), "gemma3": tiny_gemma3}
DOC_LEN, CHUNK = 100, 16  # seven chunks, the last one partial


def tensor_bytes(cache) -> int:
    """Independent count: every tensor attribute of every layer object (shared ones once)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def doc_ids(n: int = DOC_LEN) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    return {name: api.wrap_model(make(), IdTokenizer()) for name, make in SHAPES.items()}


# ---- measured bytes ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_profile_kv_bytes_are_the_cache_tensors(models, method):
    lm = models["gemma3"]
    m = prof.measure(lm, doc_ids(), method, "0.5", chunk_size=CHUNK, raw=True, decode_tokens=3, keep_context=True)
    row, cache = m.row, m.context.engine.cache
    assert row.status == "ok"
    assert row.kv_bytes == tensor_bytes(cache) == sum(row.kv_bytes_all_layers)  # decoding left no trace
    assert row.trace[-1]["kv_bytes"] == row.kv_bytes and row.trace[-1]["tokens"] == DOC_LEN
    assert len(row.trace) == 7 and all(t["rss_bytes"] > 0 for t in row.trace)
    assert row.tokens == DOC_LEN and row.decode_tokens == 3
    assert row.ttft_seconds > 0 and row.prefill_tokens_per_second > 0 and row.decode_tokens_per_second > 0
    assert row.peak_rss_bytes >= row.rss_baseline_bytes > 0
    assert row.cuda_peak_bytes is None  # CPU
    if method != "full" and not method.startswith("pod"):  # PoD keeps all of a doc shorter than recent_min
        assert row.kv_bytes < row.kv_bytes_full


# ---- the estimate mirrors the cache ------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("budget", ["0.5:uniform", "1.0", "40:uniform", "0.5", "40"])
def test_estimate_equals_measured_bytes(models, shape, method, budget):
    lm = models[shape]
    ctx = api.prefill(lm, doc_ids(), method=method, budget=budget, chunk_size=CHUNK, raw=True)
    rep, stats = ctx.report(), ctx.engine.stats
    est = estimate_kv_bytes(lm.model.config, DOC_LEN, method, budget, lm.dtype, chunk_size=CHUNK)
    assert est.kv_bytes == rep.kv_bytes == tensor_bytes(ctx.engine.cache)
    if ctx.engine.budget.allocation != "uniform" and not ctx.engine.budget.is_full:
        # ranked across layers (the default, "heads"): how the layers share the total depends
        # on the scores, which an estimate does not have; the totals are exact
        assert sum(est.kv_bytes_all_layers) == sum(rep.kv_bytes_all_layers)
        assert sum(est.kept_tokens) == sum(rep.kept_tokens) and est.peak_prefill_kv_bytes == stats.max_cache_bytes
        return
    assert est.kv_bytes_all_layers == rep.kv_bytes_all_layers
    assert est.kv_bytes_full == rep.kv_bytes_full
    assert (est.kept_tokens, est.compressed_layers) == (rep.kept_tokens, rep.compressed_layers)
    assert est.peak_prefill_kv_bytes == stats.max_cache_bytes
    assert est.trace == stats.trace
    assert sum(layer.bytes for layer in est.per_layer) == est.kv_bytes


def test_estimate_of_the_embedded_model_layout():
    # Gemma 3 270M: 18 layers, 3 full-attention (5, 11, 17), window 512, 1 KV head x 256.
    cfg = {
        "model_type": "gemma3_text",
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_size": 640,
        "sliding_window": 512,
        "layer_types": ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)],
    }
    full = estimate_kv_bytes(cfg, 8192, "full", 1.0, "float32")
    entry = 2 * 256 * 4
    assert full.kv_bytes == 3 * 8192 * entry + 15 * 511 * entry == full.kv_bytes_full
    assert full.compressed_layers == [5, 11, 17]
    half = estimate_kv_bytes(cfg, 8192, "streaming", 0.5, "bfloat16")
    # streaming materialises positions (int64) once it has compressed; no statistics
    assert half.kv_bytes == 3 * 4096 * (2 * 256 * 2 + 8) + 15 * 511 * 2 * 256 * 2
    # the peak is at the last chunk boundary, before compression: half of 7680 plus a chunk
    assert half.peak_prefill_kv_bytes == half.kv_bytes + 3 * (3840 + 512 - 4096) * (2 * 256 * 2 + 8)
    merged = estimate_kv_bytes(cfg, 8192, "kvmerger", 0.5, "float32")
    # + positions int64, counts, scores and obs float32 per entry
    assert merged.kv_bytes == 3 * 4096 * (entry + 8 + 3 * 4) + 15 * 511 * entry
    # a raw config.json dict and transformers' config class agree
    assert (
        estimate_kv_bytes(
            transformers.Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}),
            8192,
            "kvmerger",
            0.5,
            "float32",
        ).kv_bytes
        == merged.kv_bytes
    )


def test_estimate_rejects_bad_input(tmp_path):
    cfg = tiny_llama().config
    with pytest.raises(KvcliError, match="unknown method"):
        estimate_kv_bytes(cfg, 100, "nosuch", 0.5, "float32")
    with pytest.raises(KvcliError, match="budget"):
        estimate_kv_bytes(cfg, 100, "h2o", 1.5, "float32")
    with pytest.raises(KvcliError, match="dtype"):
        estimate_kv_bytes(cfg, 100, "h2o", 0.5, "float8")
    with pytest.raises(KvcliError, match="no such file"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(KvcliError, match="JSON"):
        load_config(tmp_path / "bad.json")


# ---- CLI: --estimate ---------------------------------------------------------------------------------
def _tiny_config(tmp_path):
    path = tmp_path / "config.json"
    tiny_gemma3(layers=6, window=32).config.to_json_file(str(path))
    return path


def test_cli_estimate_from_config_json(tmp_path):
    path = _tiny_config(tmp_path)
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(path),
            "--context",
            "1000",
            "--budget",
            "0.35",
            "--estimate",
            "--json",
            "--methods",
            "full,streaming,kvmerger",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full", "streaming", "kvmerger"]
    cfg = load_config(path)
    for r in rows:
        assert r["estimate"] is True and r["context_tokens"] == 1000
        expect = estimate_kv_bytes(cfg, 1000, r["method"], "1" if r["method"] == "full" else "0.35", "float32")
        assert r["kv_bytes"] == expect.kv_bytes
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes"]
    # the model directory works too, and the text output says it is an estimate, per layer on request
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tmp_path),
            "--context",
            "1000",
            "--budget",
            "0.35",
            "--estimate",
            "--per-layer",
            "--methods",
            "full,h2o",
            "--plot",
            str(tmp_path / "e.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ESTIMATE" in result.stdout and "no weights loaded" in result.stdout
    assert "per layer" in result.stdout and (tmp_path / "e.png").stat().st_size > 0


def test_cli_estimate_unknown_model_type_reads_raw_fields(tmp_path):
    cfg = {
        "model_type": "not-in-transformers",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tmp_path / "config.json"),
            "--context",
            "100",
            "--estimate",
            "--json",
            "--methods",
            "full",
            "--dtype",
            "float16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["kv_bytes"] == 2 * 100 * 2 * 2 * 16 * 2


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _estimate_row(*args: str) -> dict:
    result = runner.invoke(app, ["profile", "--estimate", "--json", "--methods", "full", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)[0]


def test_estimate_prices_the_dtype_the_configuration_declares(tmp_path):
    llama = str(EXAMPLES / "llama-2-7b-32k-config.json")  # "torch_dtype": "float16"
    row = _estimate_row("--model", llama, "--context", "32768")
    # 32 layers x 32 KV heads x head_dim 128 x (keys + values) x 32K tokens x 2 bytes
    assert row["dtype"] == "float16" and row["kv_bytes"] == 32 * 32 * 128 * 2 * 32768 * 2 == 16 * 1024**3
    assert _estimate_row("--model", llama, "--context", "32768", "--dtype", "float32")["kv_bytes"] == 32 * 1024**3
    table = runner.invoke(app, ["profile", "--estimate", "--model", llama, "--context", "4096", "--methods", "full"])
    assert table.exit_code == 0 and "float16 (from the configuration)" in table.stdout
    # a raw config.json (a model type transformers does not know) with the newer "dtype" key
    cfg = {"model_type": "unknown-kind", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert _estimate_row("--model", str(tmp_path), "--context", "100")["dtype"] == "bfloat16"
    # nothing declared: what kvcli loads on the device (float32 on the CPU)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _estimate_row("--model", str(tmp_path), "--context", "100", "--device", "cpu")["dtype"] == "float32"


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "/nonexistent/config.json"], "no such file"),
        (["--methods", "full,nosuch"], "unknown method"),
        (["--budget", "2.5"], "budget"),
        (["--plot", "out.txt"], "--plot"),
        (["--tokens", "0"], "--tokens"),
    ],
)
def test_cli_profile_errors_are_kvcli_errors(tmp_path, args, match):
    path = _tiny_config(tmp_path)
    base = ["profile", "--estimate", "--model", str(path)]
    result = runner.invoke(app, base + args)
    assert result.exit_code != 0
    assert isinstance(result.exception, KvcliError) and match in str(result.exception)


# ---- CLI: measured, on a tiny model saved to disk ---------------------------------------------------------
WORDS = "the lighthouse keeper wrote a report about ships storms lamps and the sea every night".split()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    d = tmp_path_factory.mktemp("tiny-model")
    vocab = {
        "[UNK]": 0,
        "<s>": 1,
        "</s>": 2,
        **{
            w: i + 3
            for i, w in enumerate(
                dict.fromkeys(WORDS + ["question", "answer", "what", "is", "main", "point", "of", "document", "?", ":"])
            )
        },
    }
    tk = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )
    fast.save_pretrained(d)
    tiny_llama(2).save_pretrained(d)
    doc = d / "doc.txt"
    doc.write_text(" ".join(WORDS * 20))  # 300 tokens
    return d


def test_cli_profile_measures_each_method(tiny_model_dir, tmp_path):
    plot = tmp_path / "p.png"
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tiny_model_dir),
            "--doc",
            str(tiny_model_dir / "doc.txt"),
            "--tokens",
            "200",
            "--methods",
            "full,streaming,h2o",
            "--chunk-size",
            "32",
            "--decode-tokens",
            "3",
            "--no-isolate",
            "--json",
            "--plot",
            str(plot),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full", "streaming", "h2o"]
    for r in rows:
        assert r["status"] == "ok" and r["decode_tokens"] == 3
        assert r["tokens"] == 201  # BOS + the first 200 tokens
        assert r["kv_bytes"] == r["trace"][-1]["kv_bytes"] == sum(r["kv_bytes_all_layers"])
    assert rows[0]["kv_bytes"] == rows[0]["kv_bytes_full"] and rows[1]["kv_ratio"] < 0.6
    assert plot.stat().st_size > 0
    table = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tiny_model_dir),
            "--doc",
            str(tiny_model_dir / "doc.txt"),
            "--methods",
            "full,streaming",
            "--chunk-size",
            "64",
            "--decode-tokens",
            "2",
            "--no-isolate",
            "--per-layer",
            "--quiet",
        ],
    )
    assert table.exit_code == 0, table.output
    assert "streaming" in table.stdout and "peak RSS" in table.stdout and "KV bytes per layer" in table.stdout


@pytest.mark.parametrize("full", [False, True])
def test_bare_profile_is_the_headline_methods_on_a_short_document(tiny_model_dir, monkeypatch, full):
    """What a bare `kvcli profile` measures, said up front; --full is the exhaustive run."""
    from kvcli.core import defaults

    seen = {}

    def fake_run(spec, lm=None, isolate=True, on_event=None):
        seen["spec"] = spec
        return prof.ProfileResult([])

    monkeypatch.setattr(prof, "run_profile", fake_run)
    result = runner.invoke(
        app, ["profile", "--model", str(tiny_model_dir), "--no-isolate", *(["--full"] if full else [])]
    )
    assert result.exit_code == 0, result.output
    spec = seen["spec"]
    tokens = defaults.PROFILE_FULL_TOKENS if full else defaults.PROFILE_TOKENS
    assert spec.methods == (method_names() if full else list(defaults.HEADLINE_METHODS))
    assert spec.source == f"generated haystack ({tokens} tokens)" and spec.budget == "0.5:auto"
    plan = " ".join(result.stderr.split())
    assert f"{len(spec.methods)} methods ({', '.join(spec.methods)}), budget 0.5:auto" in plan
    assert f"Plan: {len(spec.methods)} prefills of" in plan and "all in this process" in plan
    assert ("--full: every method" in plan) is not full


def test_ctrl_c_prints_what_was_measured_and_exits_130(tiny_model_dir, monkeypatch):
    from kvcli.cli import profile as cli_profile

    def interrupt(self, event, method, data):
        if event == "chunk" and method == "streaming" and data[0] >= 64:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli_profile.ProfileProgress, "__call__", interrupt)
    result = runner.invoke(
        app,
        [
            "profile",
            "--model",
            str(tiny_model_dir),
            "--doc",
            str(tiny_model_dir / "doc.txt"),
            "--methods",
            "full,streaming,h2o",
            "--chunk-size",
            "32",
            "--decode-tokens",
            "2",
            "--no-isolate",
            "--json",
        ],
    )
    assert result.exit_code == 130
    rows = json.loads(result.stdout)
    assert [r["method"] for r in rows] == ["full", "streaming"]
    assert rows[0]["status"] == "ok" and rows[1]["status"] == "interrupted"
    assert rows[1]["tokens"] == 64 and rows[1]["peak_rss_bytes"] > 0
    assert "the results above are what was measured so far" in result.stderr


def test_isolated_child_process_reports_a_row(tiny_model_dir):
    spec = prof.ProfileSpec(
        document=(tiny_model_dir / "doc.txt").read_text(),
        methods=["streaming"],
        budget="0.5",
        chunk_size=64,
        decode_tokens=2,
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
    )
    events = []
    result = prof.run_profile(spec, isolate=True, on_event=lambda e, m, d: events.append(e))
    (row,) = result.rows
    assert not result.interrupted and row.status == "ok", row
    assert row.rss_method in ("vmhwm", "sampled") and row.peak_rss_bytes >= row.rss_baseline_bytes
    assert row.kv_bytes < row.kv_bytes_full and row.decode_tokens == 2
    assert events[:2] == ["start", "loaded"] and "chunk" in events and events[-1] == "done"


@pytest.mark.slow
def test_profile_embedded_model_small():
    result = runner.invoke(
        app,
        [
            "profile",
            "--tokens",
            "600",
            "--methods",
            "full,streaming",
            "--decode-tokens",
            "2",
            "--no-isolate",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    full, streaming = json.loads(result.stdout)
    assert full["kv_bytes"] == full["kv_bytes_full"]
    assert streaming["kv_bytes"] < full["kv_bytes"]
    from kvcli.engine.models import embedded_model_dir

    cfg = load_config(embedded_model_dir())
    est = estimate_kv_bytes(cfg, streaming["tokens"], "streaming", "0.5", "float32")
    assert est.kv_bytes == streaming["kv_bytes"]
    assert cache_shape(cfg, "float32").growing_indices == streaming["compressed_layers"]
