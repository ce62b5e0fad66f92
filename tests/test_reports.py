"""Typed results keep the JSON keys users' scripts read (``--json`` of ask / summarize,
``profile --json``, eval's results files)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from kvcli import api
from kvcli.api import PrefillReport
from kvcli.eval.rows import COLUMNS, EvalRow, RunSummary
from kvcli.profile.estimate import Estimate, estimate_kv_bytes
from kvcli.profile.profile import ProfileRow

from conftest import IdTokenizer, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"

#: ``Context.report()``'s keys before it was typed, in order (what ``--json`` prints after the answers).
REPORT_KEYS = [
    "model", "method", "method_options", "budget", "scoring", "context_tokens", "truncated_tokens", "kv_bytes",
    "kv_bytes_full", "kv_ratio", "compressed_layers", "kv_bytes_per_layer", "kv_bytes_all_layers", "kept_tokens",
    "peak_rss_bytes", "peak_prefill_kv_bytes", "peak_scoring_kv_bytes", "prefill_seconds",
    "prefill_tokens_per_second", "compress_seconds", "scoring_seconds", "decode_seconds", "chunk_size", "adapter",
]  # fmt: skip
#: A measured profile row's keys (status "ok"), in order; the CLI adds document and isolated.
PROFILE_KEYS = [
    "method", "budget", "model", "device", "dtype", "chunk_size", "status", "rss_baseline_bytes", "rss_method",
    "method_options", "tokens", "truncated_tokens", "kv_bytes", "kv_bytes_full", "kv_ratio",
    "peak_prefill_kv_bytes", "compressed_layers", "kv_bytes_all_layers", "kept_tokens", "prefill_seconds",
    "prefill_tokens_per_second", "compress_seconds", "trace", "ttft_seconds", "decode_tokens", "decode_seconds",
    "decode_tokens_per_second", "peak_rss_bytes", "cuda_peak_bytes",
]  # fmt: skip
ESTIMATE_KEYS = [
    "estimate", "method", "method_options", "budget", "dtype", "context_tokens", "chunk_size", "kv_bytes",
    "kv_bytes_full", "kv_ratio", "compressed_layers", "kv_bytes_per_layer", "kv_bytes_all_layers", "kept_tokens",
    "per_layer", "peak_prefill_kv_bytes", "trace",
]  # fmt: skip
SUMMARY_KEYS = ["method", "budget", "label", "scores", "overall", "logprob_delta", "pct_of_full", "kv_ratio",
                "prefill_seconds", "n"]  # fmt: skip


def test_context_report_has_the_same_keys():
    lm = api.wrap_model(tiny_llama(), IdTokenizer())
    ctx = api.prefill(lm, torch.arange(3, 83), method="h2o", budget="40", chunk_size=16, raw=True)
    report = ctx.report()
    assert isinstance(report, PrefillReport)
    data = report.as_dict()
    assert list(data) == REPORT_KEYS
    assert data["kv_bytes"] == report.kv_bytes == ctx.engine.cache.nbytes()
    assert data["method_options"] == {"n_sink": 4, "recent": 0.5}


def test_the_readme_json_keys_are_report_keys():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("`--json` prints one object") :].split("\n\n")[0]
    named = set(re.findall(r"`([a-z_]+)`", section)) - {"answers", "summary"}
    assert named and named <= set(REPORT_KEYS)


def test_profile_rows_have_the_same_keys():
    row = ProfileRow(method="h2o", budget="0.5")
    assert list(row.as_dict()) == PROFILE_KEYS
    row.document, row.isolated = "doc.txt", True
    assert list(row.as_dict()) == [*PROFILE_KEYS, "document", "isolated"]
    failed = ProfileRow.failed("h2o", "0.5", "h2o: out of memory")
    failed.document, failed.isolated = "doc.txt", True
    assert failed.as_dict() == {"method": "h2o", "budget": "0.5", "status": "error", "error": "h2o: out of memory",
                                "document": "doc.txt", "isolated": True}  # fmt: skip
    assert ProfileRow(**row.as_dict()) == row  # the child process sends rows as JSON


def test_estimate_rows_have_the_same_keys():
    est = estimate_kv_bytes(tiny_llama().config, 100, "kvmerger", "0.5", "float32", chunk_size=16)
    assert isinstance(est, Estimate) and list(est.as_dict()) == ESTIMATE_KEYS
    est.model = "config.json"
    assert list(est.as_dict()) == [*ESTIMATE_KEYS, "model"]
    assert est.as_dict()["per_layer"][0]["bytes"] == est.per_layer[0].bytes


def test_eval_rows_have_the_csv_columns():
    assert tuple(f.name for f in dataclasses.fields(EvalRow)) == COLUMNS
    assert [f.name for f in dataclasses.fields(RunSummary)] == SUMMARY_KEYS
