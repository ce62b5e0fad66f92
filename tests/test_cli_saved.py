"""``kvcli compress``, ``kvcli info`` and answering from a ``.kvc`` on the command line: the
same answers as from the document; a .kvc where a document goes (or the reverse), a file
from another model, a cut file, an existing output: one line on stderr, exit 2, nothing
written; ``info`` imports no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcli.cli.app import main
from kvcli.core import defaults
from kvcli.core.budget import parse_budget
from kvcli.methods import make_method

from conftest import WORDS, save_word_llama
from test_cli import assert_one_line_error, run_cli

# "0.5" as reports write it for snapkv with the default allocation ("auto": snapkv's own, "0.5:relative")
DEFAULT_HALF = str(make_method("snapkv").budget_for(parse_budget("0.5", defaults.ALLOCATION)))

SETTINGS = ["-m", "snapkv", "-b", "0.5", "--chunk-size", "32", "--scoring", "window"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_word_llama(tmp_path_factory.mktemp("tiny-llama"), layers=2)


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """The same shapes and tokenizer, other weights."""

    def perturb(model):
        import torch

        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        return model

    return save_word_llama(tmp_path_factory.mktemp("tiny-llama-other"), layers=2, prepare=perturb)


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))
    return lambda *args: run_cli(list(args), capfd, monkeypatch)


DOC_TEXT = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(120))


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text(DOC_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compressed(model_dir, tmp_path_factory) -> bytes:
    """``kvcli compress doc.txt -O doc.kvc --model DIR`` + ``SETTINGS``, once for the module."""
    folder = tmp_path_factory.mktemp("compressed")
    (folder / "doc.txt").write_text(DOC_TEXT, encoding="utf-8")
    args = ["compress", str(folder / "doc.txt"), "-O", str(folder / "doc.kvc"), "--model", str(model_dir)]
    argv = sys.argv
    sys.argv = ["kvcli", *args, *SETTINGS, "-q"]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        sys.argv = argv
    return (folder / "doc.kvc").read_bytes()


@pytest.fixture
def kvc(compressed, tmp_path) -> Path:
    (tmp_path / "doc.kvc").write_bytes(compressed)
    return tmp_path / "doc.kvc"


def test_answers_from_the_kvc_are_the_answers_from_the_document(cli, doc, kvc, model_dir):
    questions = ["w1 w2", "w3"]
    direct = cli("ask", doc, *questions, "--model", model_dir, *SETTINGS, "--max-new-tokens", "6", "--json")
    saved = cli("ask", kvc, *questions, "--max-new-tokens", "6", "--json")  # the model named by the file
    assert direct.code == 0 and saved.code == 0, (direct.err, saved.err)
    a, b = json.loads(direct.out), json.loads(saved.out)
    assert a["answers"] == b["answers"]
    assert (a["kv_bytes"], a["context_tokens"], a["method"]) == (b["kv_bytes"], b["context_tokens"], b["method"])
    summary = cli("summarize", kvc, "--max-new-tokens", "5", "--json")
    assert summary.code == 0 and json.loads(summary.out)["summary"], summary.err


def test_compress_default_output_and_json(cli, doc, model_dir, tmp_path):
    res = cli("compress", doc, "--model", model_dir, *SETTINGS, "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["output"] == "doc.kvc" and (tmp_path / "doc.kvc").stat().st_size == report["file_bytes"]
    assert report["kv_bytes"] < report["file_bytes"] < report["kv_bytes"] + 16_384


def test_info(cli, kvc, doc):
    res = cli("info", kvc)
    assert res.code == 0, res.err
    for needle in ("snapkv", "budget", "0.5", "window", "doc.txt", "sha256", "bytes per layer", "growing"):
        assert needle in res.out
    data = json.loads(cli("info", kvc, "--json").out)
    assert data["method"] == "snapkv" and data["budget"] == DEFAULT_HALF and data["scoring"] == "window"
    assert data["sources"][0]["name"] == "doc.txt" and data["context_tokens"] == 121  # BOS + 120 words
    import hashlib

    assert data["sources"][0]["sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()
    assert sum(data["bytes_per_layer"]) == data["kv_bytes"]
    assert set(data["model"]) >= {"config_sha256", "tokenizer_sha256", "weights_sha256"}


def test_existing_output_is_kept_without_force(cli, doc, kvc, model_dir):
    before = kvc.read_bytes()
    res = cli("compress", doc, "-O", kvc, "--model", model_dir, "-q")
    assert_one_line_error(res, "exists", "--force")
    assert res.code == 2 and kvc.read_bytes() == before
    res = cli("compress", doc, "-O", kvc, "--model", model_dir, "-q", "--force", "-m", "streaming", "-b", "0.25")
    assert res.code == 0, res.err
    assert json.loads(cli("info", kvc, "--json").out)["method"] == "streaming"


def test_wrong_kind_of_file(cli, doc, kvc, model_dir, tmp_path):
    assert_one_line_error(cli("compress", kvc, "--model", model_dir), "saved context", "not a document")
    assert_one_line_error(cli("info", doc), "is a document", "kvcli compress")
    assert_one_line_error(cli("compress", doc, "-O", tmp_path / "out.txt"), ".kvc")
    assert_one_line_error(cli("compress", doc, "--append", doc), "not a usable kvcli context")
    assert_one_line_error(cli("ask", kvc, "q", "-m", "h2o"), "--method", "saved context")
    assert_one_line_error(cli("summarize", kvc, "--budget", "0.3"), "--budget", "saved context")
    assert_one_line_error(cli("compress", doc, "--scoring", "question"), "no questions")
    assert_one_line_error(cli("compress", "-"), "stdin", "--output")


def test_another_model_cut_files_and_forged_ones(cli, kvc, other_model_dir, tmp_path):
    res = cli("ask", kvc, "q", "--model", other_model_dir, "-q")
    assert_one_line_error(res, "another model", "weights")
    assert res.code == 2 and res.out == ""
    data = kvc.read_bytes()
    for name, blob in {
        "cut.kvc": data[: len(data) // 2],
        "flipped.kvc": data[:-200] + bytes([data[-200] ^ 1]) + data[-199:],
        "empty.kvc": b"",
        "text.kvc": b"just some text that is not a context at all",
    }.items():
        (tmp_path / name).write_bytes(blob)
        for args in (["ask", tmp_path / name, "q"], ["info", tmp_path / name], ["summarize", tmp_path / name]):
            res = cli(*args)
            assert_one_line_error(res, name)
            assert res.code == 2


def test_append(cli, kvc, model_dir, tmp_path):
    more = tmp_path / "more.txt"
    more.write_text(" ".join(WORDS[(i * 3) % len(WORDS)] for i in range(50)), encoding="utf-8")
    res = cli("compress", more, "--append", kvc, "-O", tmp_path / "both.kvc", "-q")
    assert res.code == 0, res.err
    data = json.loads(cli("info", tmp_path / "both.kvc", "--json").out)
    assert data["context_tokens"] == 121 + 50 and [s["name"] for s in data["sources"]] == ["doc.txt", "more.txt"]
    assert data["budget"] == DEFAULT_HALF and data["method"] == "snapkv"
    assert_one_line_error(cli("compress", more, "--append", kvc, "-m", "h2o"), "--method", "saved context")
    res = cli("ask", tmp_path / "both.kvc", "w1", "--max-new-tokens", "3", "-q")
    assert res.code == 0 and res.out.strip(), res.err


def test_info_and_bad_files_import_no_torch(kvc, tmp_path):
    """``info`` reads the header only (safetensors' JSON), and a bad .kvc fails before torch loads."""
    (tmp_path / "cut.kvc").write_bytes(kvc.read_bytes()[:100])
    cases = [["info", str(kvc)], ["info", str(kvc), "--json"], ["ask", str(tmp_path / "cut.kvc"), "q"]]
    script = (
        "import json, sys\n"
        "from kvcli.cli.app import main\n"
        "codes = []\n"
        f"for args in {cases!r}:\n"
        "    sys.argv = ['kvcli', *args]\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLI_")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 2], "heavy": []}, proc.stderr
