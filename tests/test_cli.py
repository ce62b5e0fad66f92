"""The CLI's promise for bad input: a non-zero exit and one clear line on stderr, no traceback.

Most cases run ``kvcli.cli.main()`` in this process (argv patched, stderr captured at the
file-descriptor level): importing torch + transformers costs 5-15 s per process on the
2-core CI machines, so a subprocess per case would make this file slow.  A few cases run
the real console script in a subprocess, to check the installed entry point end to end.
None of these tests needs the embedded model; the "document too long" cases use a tiny
Llama model directory written to ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvcli.cli.app import main

from conftest import WORDS, make_pdf, save_word_llama

# --------------------------------------------------------------------------- helpers


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(args: list[str], capfd, monkeypatch) -> Result:
    """Run ``kvcli ARGS`` in-process; returns exit code and captured stdout/stderr."""
    capfd.readouterr()  # drop anything captured before
    monkeypatch.setattr(sys, "argv", ["kvcli", *[str(a) for a in args]])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capfd.readouterr()
    return Result(code, captured.out, captured.err)


def cli_command() -> list[str]:
    """The installed console script, else the same entry point through this interpreter."""
    script = shutil.which("kvcli") or shutil.which("kvcli", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c", "from kvcli.cli.app import main; main()"]


def run_subprocess(args: list[str], env: dict | None = None, timeout: float = 120) -> tuple[Result, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cli_command(), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr), time.perf_counter() - t0


def assert_one_line_error(res: Result, *needles: str) -> str:
    """Non-zero exit; stderr is exactly one non-empty line, no traceback, naming the cause."""
    assert res.code != 0, f"expected failure, got exit 0; stdout={res.out!r}"
    text = res.err.strip()
    assert text, "stderr is empty"
    assert len(text.splitlines()) == 1, f"stderr is not one line:\n{res.err}"
    assert "Traceback" not in res.err
    low = text.lower()
    for needle in needles:
        assert needle.lower() in low, f"{needle!r} not in {text!r}"
    return text


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The lighthouse keeper's name is Alma.\n", encoding="utf-8")
    return path


@pytest.fixture
def cli(capfd, monkeypatch):
    return lambda *args: run_cli(list(args), capfd, monkeypatch)


# --------------------------------------------------------------------------- documents


def test_missing_file(cli, tmp_path):
    missing = tmp_path / "nope.txt"
    assert_one_line_error(cli("ask", missing, "q"), str(missing), "no such file")


def test_directory(cli, tmp_path):
    assert_one_line_error(cli("ask", tmp_path, "q"), str(tmp_path), "directory")


def test_empty_document(cli, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n", encoding="utf-8")
    assert_one_line_error(cli("ask", path, "q"), str(path), "empty")


def test_binary_junk(cli, tmp_path):
    path = tmp_path / "junk.txt"
    path.write_bytes(bytes(range(256)) * 16)
    assert_one_line_error(cli("ask", path, "q"), str(path), "binary")


def test_encrypted_pdf(cli, tmp_path):
    path = tmp_path / "secret.pdf"
    path.write_bytes(make_pdf(["Top secret harbour plans"], password="hunter2"))
    assert_one_line_error(cli("ask", path, "q"), str(path), "encrypted", "password")


def test_corrupt_pdf(cli, tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\n" + bytes(range(256)) * 4 + b"\n%%EOF")
    assert_one_line_error(cli("ask", path, "q"), str(path), "pdf")


def test_truncated_pdf(cli, tmp_path):
    path = tmp_path / "cut.pdf"
    data = make_pdf(["Half a document"])
    path.write_bytes(data[: len(data) // 3])
    assert_one_line_error(cli("ask", path, "q"), str(path), "pdf")


# --------------------------------------------------------------------------- options


def test_unknown_method_lists_valid_ones(cli, doc):
    msg = assert_one_line_error(cli("ask", doc, "q", "--method", "bogus"), "bogus")
    for name in ("full", "streaming", "h2o", "snapkv", "kvmerger", "pod"):
        assert name in msg


def test_unknown_method_summarize(cli, doc):
    assert_one_line_error(cli("summarize", doc, "-m", "nope"), "nope", "kvmerger")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "2.5", "1.5"])
def test_malformed_budget(cli, doc, value):
    assert_one_line_error(cli("ask", doc, "q", f"--budget={value}"), "budget", value)


def test_unknown_preset(cli, doc):
    assert_one_line_error(cli("ask", doc, "q", "--preset", "no-such-preset"), "no-such-preset", "preset", "lossless")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_device_cuda_without_cuda(cli, doc):
    assert_one_line_error(cli("ask", doc, "q", "--device", "cuda"), "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_attn_triton_without_cuda(cli, doc, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the kernel tests set it (interpreter allows CPU)
    assert_one_line_error(cli("ask", doc, "q", "--attn", "triton"), "triton", "cuda")


def test_unknown_attn(cli, doc):
    assert_one_line_error(cli("ask", doc, "q", "--attn", "magic"), "magic", "sdpa")


def test_model_directory_missing(cli, doc, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(cli("ask", doc, "q", "--model", missing), str(missing))


def test_model_directory_without_config(cli, doc, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "README.txt").write_text("nothing here", encoding="utf-8")
    assert_one_line_error(cli("ask", doc, "q", "--model", empty), str(empty), "config.json")


def _clean_env(tmp_path) -> dict:
    """The caller's environment without any HF setting (so kvcli's own offline guard is
    what is tested) and with an empty Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    return env


@pytest.fixture(scope="module")
def missing_file_run(tmp_path_factory):
    """One real process on a missing file: checks the entry point and measures startup."""
    tmp = tmp_path_factory.mktemp("console")
    missing = tmp / "missing.md"
    res, seconds = run_subprocess(["summarize", missing], env=_clean_env(tmp))
    return missing, res, seconds


def test_console_script_missing_file(missing_file_run):
    """The installed entry point (not just ``main()``) prints one line and exits non-zero."""
    missing, res, _ = missing_file_run
    assert_one_line_error(res, str(missing), "no such file")
    assert res.out == ""


def test_hub_id_not_cached_fails_fast(doc, tmp_path, missing_file_run):
    """A hub id that is not in the local cache fails at once: kvcli never waits on the network.

    The bound is 20 s; on a loaded machine where merely starting kvcli (importing torch and
    transformers, measured on a missing file just before, under the same load) takes longer,
    it is three times that.
    """
    startup = run_subprocess(["summarize", missing_file_run[0]], env=_clean_env(tmp_path))[1]
    res, seconds = run_subprocess(
        ["ask", doc, "q", "--model", "kvcli-test-org/definitely-not-cached"], env=_clean_env(tmp_path)
    )
    assert_one_line_error(res, "kvcli-test-org/definitely-not-cached", "cache")
    assert seconds < max(20.0, 3 * startup), f"took {seconds:.1f} s to fail (startup alone {startup:.1f} s)"


# --------------------------------------------------------------------------- too long for the model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with 512 positions and a word-level tokenizer, saved like a hub model."""
    return save_word_llama(tmp_path_factory.mktemp("tiny-llama-512"), layers=2)


@pytest.fixture
def long_doc(tmp_path) -> Path:
    path = tmp_path / "long.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(1000)), encoding="utf-8")  # 1001 tokens with BOS
    return path


def test_document_longer_than_model(cli, tiny_model_dir, long_doc):
    res = cli("ask", long_doc, "q", "--model", tiny_model_dir, "--quiet")
    msg = assert_one_line_error(res, "512", "--truncate")
    assert "1001" in msg  # the document's length in tokens
    assert res.out == ""


def test_document_longer_than_model_truncate(cli, tiny_model_dir, long_doc):
    res = cli("ask", long_doc, "q", "--model", tiny_model_dir, "--truncate", "--max-new-tokens", "4")
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    assert "truncated" in res.err and "kept the first 256 tokens" in res.err, res.err
    assert "dropped 745" in res.err


def test_document_longer_than_model_truncate_json(cli, tiny_model_dir, long_doc):
    import json

    res = cli("ask", long_doc, "q", "--model", tiny_model_dir, "--truncate", "--json", "--max-new-tokens", "4")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["context_tokens"] == 256
    assert report["truncated_tokens"] == 745


def test_quiet_libraries_silences_tqdm_bars(tmp_path):
    """transformers' GGUF conversion draws a plain tqdm bar (no Hugging Face switch reaches
    it).  tqdm reads its environment when it is imported, so ``main`` quiets the libraries
    before anything imports them: in a fresh process, a bar made after ``quiet_libraries``
    writes nothing, and without it the same bar is drawn."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "if sys.argv[1] == 'quiet':\n"
        "    from kvcli.cli.quiet import quiet_libraries; quiet_libraries()\n"
        "from tqdm.auto import tqdm\n"
        "for _ in tqdm(range(3), desc='converting'): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "HF_HUB_", "TRANSFORMERS_"))}

    def drawn(mode: str) -> str:
        run = subprocess.run([sys.executable, "-c", code, mode], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stderr + run.stdout

    assert "converting" in drawn("loud")
    assert drawn("quiet") == ""
