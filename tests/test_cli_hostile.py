"""Hostile input and faults at the command line (issues 20 and 21): exit status that tells
the truth (0 / 1 / 2 / 130), one line naming the option or file, nothing checked after the
model loads that could be checked before, and nothing half-written.

Most cases run ``main()`` in this process (cheap); what needs a real process (signals, the
set of imported modules, warnings printed by libraries) runs in a subprocess.  Where a model
is needed it is a tiny random Llama saved to a temporary directory, never the embedded one.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcli.cli import checks
from kvcli.cli.config import load_defaults
from kvcli.core.errors import KvcliError
from kvcli.core.fileio import atomic_write_text, read_text_file

from conftest import WORDS, make_pdf, save_word_llama
from test_cli import assert_one_line_error, cli_command, run_cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    # No user config or KVCLI_* variable may leak in; a config file only where a test writes one.
    for key in list(os.environ):
        if key.startswith("KVCLI_") and key != "KVCLI_CACHE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("KVCLI_CONFIG", str(tmp_path / "no-config.toml"))
    (tmp_path / "no-config.toml").write_text("", encoding="utf-8")
    return lambda *args: run_cli(list(args), capfd, monkeypatch)


@pytest.fixture
def doc(tmp_path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The lighthouse keeper's name is Alma.\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_word_llama(tmp_path_factory.mktemp("tiny-llama"), layers=2)


@pytest.fixture
def word_doc(tmp_path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(60)), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, positions: int = 4096) -> Path:
    """A Llama ``config.json`` for ``profile --estimate`` (no weights)."""
    path = tmp_path / "config.json"
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": positions,
        "vocab_size": 128,
    }
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- usage errors: exit 2, the option named
USAGE = {
    "unknown option": (["ask", "{doc}", "q", "--bogus"], ["--bogus"]),
    "unknown command": (["bogus"], ["bogus"]),
    "missing document": (["ask"], ["document"]),
    "missing questions": (["ask", "{doc}"], ["questions"]),
    "chunk not a number": (["ask", "{doc}", "q", "--chunk-size", "abc"], ["--chunk-size"]),
    "chunk too small": (["ask", "{doc}", "q", "--chunk-size", "1"], ["--chunk-size", "16"]),
    "chunk zero (summarize)": (["summarize", "{doc}", "--chunk-size", "0"], ["--chunk-size"]),
    "max-new-tokens 0": (["ask", "{doc}", "q", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    "max-new-tokens -1": (["ask", "{doc}", "q", "--max-new-tokens", "-1"], ["--max-new-tokens"]),
    "max-new-tokens text": (["summarize", "{doc}", "--max-new-tokens", "lots"], ["--max-new-tokens"]),
    "temperature < 0": (["ask", "{doc}", "q", "--temperature", "-1"], ["--temperature"]),
    "temperature nan": (["ask", "{doc}", "q", "--temperature", "nan"], ["--temperature"]),
    "top-p 0": (["ask", "{doc}", "q", "--top-p", "0"], ["--top-p"]),
    "top-p 1.5": (["ask", "{doc}", "q", "--top-p", "1.5"], ["--top-p"]),
    "device": (["ask", "{doc}", "q", "--device", "gpu"], ["--device", "gpu"]),
    "dtype": (["ask", "{doc}", "q", "--dtype", "float8"], ["--dtype", "float8"]),
    "attn": (["ask", "{doc}", "q", "--attn", "magic"], ["--attn", "magic"]),
    "budget text": (["ask", "{doc}", "q", "--budget", "abc"], ["budget", "abc"]),
    "budget negative": (["ask", "{doc}", "q", "--budget", "-1"], ["budget"]),
    "method": (["ask", "{doc}", "q", "-m", "nope"], ["nope"]),
    "option without =": (["ask", "{doc}", "q", "-m", "h2o", "-o", "recent"], ["--option", "KEY=VALUE"]),
    "option not a number": (["ask", "{doc}", "q", "-m", "kvmerger", "-o", "threshold=abc"], ["threshold"]),
    "snapkv even kernel": (["ask", "{doc}", "q", "-m", "snapkv", "-o", "kernel=4"], ["kernel", "odd"]),
    "h2o recent 7": (["ask", "{doc}", "q", "-m", "h2o", "-o", "recent=7"], ["recent"]),
    "h2o old name recent_ratio 7": (["ask", "{doc}", "q", "-m", "h2o", "-o", "recent_ratio=7"], ["recent"]),
    "n_sink negative": (["ask", "{doc}", "q", "-m", "streaming", "-o", "n_sink=-5"], ["n_sink"]),
    "option no method has": (["ask", "{doc}", "q", "-m", "h2o", "-o", "kernel=5"], ["kernel"]),
    "eval chunk": (["eval", "--chunk-size", "4"], ["--chunk-size"]),
    "eval method": (["eval", "--methods", "nope"], ["nope"]),
    "eval budget": (["eval", "--budgets", "0.5,abc"], ["abc"]),
    "profile chunk": (["profile", "--chunk-size", "0"], ["--chunk-size"]),
    "profile device": (["profile", "--device", "tpu"], ["--device"]),
    "profile context above positions": (
        ["profile", "--estimate", "--model", "{config}", "--context", "10000000000"],
        ["--context", "positions"],
    ),
    "profile context not an integer": (["profile", "--estimate", "--context", "1e10"], ["--tokens"]),
    "calibrate chunk": (["calibrate", "--chunk-size", "8"], ["--chunk-size"]),
}


def _fill(args: list[str], doc: Path, tmp_path: Path) -> list[str]:
    config = tiny_config(tmp_path) if any("{config}" in a for a in args) else None
    return [a.format(doc=doc, config=config) for a in args]


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_error_exit_2(cli, doc, tmp_path, case):
    args, needles = USAGE[case]
    res = cli(*_fill(args, doc, tmp_path))
    assert res.code == 2, (res.code, res.err)
    assert_one_line_error(res, *needles)
    assert res.out == ""


def test_bare_kvcli_prints_help_exit_2(cli):
    res = cli()
    assert res.code == 2
    assert "ask" in res.out + res.err and "Usage" in res.out + res.err
    assert "internal error" not in res.err


def test_help_and_version_exit_0(cli):
    res = cli("--version")
    assert res.code == 0 and res.out.startswith("kvcli ") and "torch" in res.out
    assert cli("--help").code == 0
    assert cli("ask", "--help").code == 0


def test_internal_error_exit_1_with_hint(cli, doc, monkeypatch):
    """A bug (any exception that is not a KvcliError) is exit 1, one line, a hint to report it."""
    import kvcli.cli.ask as ask_module

    def broken(*args, **kwargs):
        raise ValueError("something inside broke")

    monkeypatch.setattr(ask_module, "open_context", broken)
    res = cli("ask", doc, "q")
    assert res.code == 1
    msg = assert_one_line_error(res, "internal error", "ValueError", "something inside broke", "KVCLI_DEBUG=1")
    assert "report" in msg


# --------------------------------------------------------------------------- documents
def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.txt"
    os.mkfifo(path)
    return path


DOCUMENTS = {
    "missing": (lambda tmp: tmp / "nope.txt", ["no such file"]),
    "directory": (lambda tmp: tmp, ["directory"]),
    "fifo": (_fifo, ["fifo"]),
    "/dev/zero": (lambda tmp: Path("/dev/zero"), ["/dev/zero", "device"]),
    "empty": (lambda tmp: _write(tmp / "e.txt", b" \n\n"), ["empty"]),
    "binary": (lambda tmp: _write(tmp / "b.txt", bytes(range(256)) * 16), ["binary"]),
    "binary, no extension": (lambda tmp: _write(tmp / "blob", os.urandom(4096)), ["binary"]),
    "encrypted pdf": (lambda tmp: _write(tmp / "s.pdf", make_pdf(["secret"], password="pw")), ["encrypted"]),
    "corrupt pdf": (lambda tmp: _write(tmp / "c.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 4), ["pdf"]),
    "truncated pdf": (lambda tmp: _write(tmp / "t.pdf", make_pdf(["Half a document"])[:200]), ["pdf"]),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(DOCUMENTS))
def test_bad_document_exit_2(cli, tmp_path, case):
    make, needles = DOCUMENTS[case]
    path = make(tmp_path)
    t0 = time.perf_counter()
    res = cli("ask", path, "q")
    assert res.code == 2, (res.code, res.err)
    assert_one_line_error(res, str(path), *needles)
    assert time.perf_counter() - t0 < 30  # a FIFO or /dev/zero never blocks


def test_document_too_big(cli, tmp_path, monkeypatch):
    path = _write(tmp_path / "big.txt", b"word " * 1000)
    monkeypatch.setenv("KVCLI_MAX_DOCUMENT_BYTES", "1000")
    assert_one_line_error(cli("ask", path, "q"), str(path), "limited to", "KVCLI_MAX_DOCUMENT_BYTES")


def test_stdin_too_big(cli, monkeypatch):
    import io

    monkeypatch.setenv("KVCLI_MAX_DOCUMENT_BYTES", "1000")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"word " * 100_000)))
    assert_one_line_error(cli("ask", "-", "q"), "stdin", "limited to")


def test_bad_size_cap_variable(cli, doc, monkeypatch):
    monkeypatch.setenv("KVCLI_MAX_DOCUMENT_BYTES", "lots")
    assert_one_line_error(cli("ask", doc, "q"), "KVCLI_MAX_DOCUMENT_BYTES")


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
def test_wide_text_without_bom_answers(cli, tmp_path, tiny_model, encoding):
    """UTF-16/32 without a byte-order mark is read as text (it used to be called binary)."""
    text = " ".join(WORDS[i % len(WORDS)] for i in range(40))
    path = _write(tmp_path / "wide.txt", text.encode(encoding))
    res = cli("ask", path, "q", "--model", tiny_model, "--json", "--max-new-tokens", "2")
    assert res.code == 0, res.err
    assert json.loads(res.out)["context_tokens"] >= 40


# --------------------------------------------------------------------------- odd but valid: a warning on stderr
def test_budget_above_document_warns(cli, word_doc, tiny_model):
    res = cli("ask", word_doc, "q", "--model", tiny_model, "-m", "h2o", "--budget", "100000", "--max-new-tokens", "2")
    assert res.code == 0, res.err
    assert "--budget 100000 keeps every token" in res.err


def test_json_output_is_clean(cli, word_doc, tiny_model):
    """With --json, stdout is exactly one JSON object and stderr has no library noise."""
    res = cli("ask", word_doc, "q", "--model", tiny_model, "--json", "--max-new-tokens", "2", "-m", "h2o", "-b", "0.5")
    assert res.code == 0, res.err
    json.loads(res.out)
    assert res.err == ""


# --------------------------------------------------------------------------- config file and environment
def test_config_file_and_environment_precedence(cli, tmp_path, monkeypatch):
    cfg = tmp_path / "kvcli.toml"
    cfg.write_text('method = "kvmerger"\nbudget = 0.5\nchunk_size = 256\ndevice = "cpu"\n', encoding="utf-8")
    monkeypatch.setenv("KVCLI_CONFIG", str(cfg))
    monkeypatch.setenv("KVCLI_BUDGET", "0.35")
    res = cli("config", "--json")
    assert res.code == 0, res.err
    settings = json.loads(res.out)["settings"]
    assert settings["method"] == {**settings["method"], "value": "kvmerger", "source": f"config file {cfg}"}
    assert settings["budget"]["value"] == "0.35:auto" and settings["budget"]["source"] == "environment KVCLI_BUDGET"
    assert settings["chunk_size"]["value"] == 256
    assert settings["model"]["source"] == "default"
    assert cli("config", "--path").out.strip() == str(cfg)


def test_layered_settings_preset_replaces_lower_levels(monkeypatch, tmp_path):
    cfg = tmp_path / "kvcli.toml"
    cfg.write_text('method = "h2o"\nbudget = 0.3\n', encoding="utf-8")
    monkeypatch.setenv("KVCLI_CONFIG", str(cfg))
    monkeypatch.delenv("KVCLI_METHOD", raising=False)
    d = load_defaults()
    # a preset on the command line replaces the file's method and budget
    assert d.layered(preset="compact", method=None, budget=None) == {
        "preset": "compact",
        "method": None,
        "budget": None,
    }
    # the file's values apply when the command line says nothing; a flag wins key by key
    assert d.layered(preset=None, method=None, budget="0.5") == {"preset": None, "method": "h2o", "budget": "0.5"}
    monkeypatch.setenv("KVCLI_METHOD", "snapkv")
    assert load_defaults().layered(preset=None, method=None, budget=None)["method"] == "snapkv"


BAD_CONFIG = {
    "unknown key": ("chunksize = 512\n", ["chunksize"]),
    "bad chunk": ("chunk_size = 4\n", ["chunk_size", "16"]),
    "bad method": ('method = "nope"\n', ["method", "nope"]),
    "bad budget": ('budget = "lots"\n', ["budget"]),
    "bad toml": ("method = \n", ["invalid TOML"]),
    "bad device": ('device = "gpu"\n', ["device", "gpu"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_bad_config_file_exit_2(cli, doc, tmp_path, monkeypatch, case):
    text, needles = BAD_CONFIG[case]
    cfg = _write(tmp_path / "bad.toml", text.encode())
    monkeypatch.setenv("KVCLI_CONFIG", str(cfg))
    res = cli("ask", doc, "q")
    assert res.code == 2
    assert_one_line_error(res, "config file", str(cfg), *needles)
    assert cli("methods").code == 0  # commands that take no defaults still run
    assert cli("config", "--path").code == 0


def test_bad_environment_variable_exit_2(cli, doc, monkeypatch):
    monkeypatch.setenv("KVCLI_CHUNK_SIZE", "tiny")
    assert_one_line_error(cli("ask", doc, "q"), "KVCLI_CHUNK_SIZE")


def test_config_file_not_regular(cli, doc, tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CONFIG", str(_fifo(tmp_path)))
    assert_one_line_error(cli("ask", doc, "q"), "config file", "not a regular file")


def test_choice_tables_match_the_library():
    from kvcli.attention.backends import BACKENDS
    from kvcli.engine.models import resolve_device, resolve_dtype

    assert checks.BACKENDS == BACKENDS
    for dtype in checks.DTYPES:
        resolve_dtype(dtype, resolve_device("cpu"))
    with pytest.raises(KvcliError):
        resolve_dtype("float8", resolve_device("cpu"))
    assert [resolve_device(d).type in ("cpu", "cuda") for d in checks.DEVICES if d != "cuda"]


# --------------------------------------------------------------------------- files kvcli writes
def _umask(mask: int) -> int:
    return os.umask(mask)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_umask(tmp_path, mask, mode):
    old = _umask(mask)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}\n")
    finally:
        _umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_rewrite_keeps_the_files_mode(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_write_text(path, "new\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new\n"


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing: the old file is untouched and no temporary is left."""
    path = tmp_path / "results.json"
    path.write_text("old\n")

    class Interrupting:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            self.fh.write(text[:3])
            raise KeyboardInterrupt

        def fileno(self):
            return self.fh.fileno()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Interrupting(real_fdopen(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new content\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_read_text_file_refuses_devices_and_fifos(tmp_path):
    for path in (Path("/dev/zero"), _fifo(tmp_path)):
        with pytest.raises(KvcliError, match="not a regular file"):
            read_text_file(path, "questions file")


# --------------------------------------------------------------------------- real processes
def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLI_") or k == "KVCLI_CACHE_DIR"}
    env["KVCLI_CONFIG"] = str(_write(tmp_path / "empty.toml", b""))
    return env


def test_fast_paths_import_no_torch(tmp_path, doc):
    """--help, --version, methods, presets, config and every argument or input error are
    answered without importing torch or transformers (issue 21: well under a second)."""
    cases = [
        ["--help"],
        ["--version"],
        ["methods"],
        ["presets"],
        ["config"],
        ["ask", str(tmp_path / "missing.txt"), "q"],
        ["ask", str(doc), "q", "--chunk-size", "1"],
        ["ask", str(doc), "q", "-m", "snapkv", "-o", "kernel=4"],
        ["ask", str(doc), "q", "--max-new-tokens", "0"],
        ["ask", str(doc), "q", "--preset", "nope"],
        ["summarize", "/dev/zero"],
        ["eval", "--methods", "nope"],
        ["profile", "--chunk-size", "0"],
        ["batch", str(doc), "--ask", "q", "--summarize"],
        ["batch", str(tmp_path / "*.none"), "--ask", "q"],
        ["batch", str(doc), "--ask", "q", "--kv-memory", "lots"],
    ]
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
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(tmp_path), timeout=120
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    assert report["codes"] == [0, 0, 0, 0, 0] + [2] * (len(cases) - 5), (report, proc.stderr)


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default.  A suite started in the
    background by a non-interactive shell (``nohup pytest &``) has SIGINT ignored, which the
    child would inherit, and Python then installs no handler: the interrupt would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130(tmp_path):
    """SIGINT while kvcli waits on its document (stdin held open): exit 130, one line, nothing on stdout."""
    proc = subprocess.Popen(
        [*cli_command(), "ask", "-", "q"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        preexec_fn=_sigint_default,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write("The keeper's name is Alma.\n")
        proc.stdin.flush()
        time.sleep(3)  # started and blocked reading stdin (startup imports no torch)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "kvcli: interrupted"
    assert "Traceback" not in err and out == ""


def test_ctrl_c_during_work_leaves_no_output(tmp_path):
    """SIGINT during a long estimate with --plot: exit 130, "interrupted", no plot file."""
    config = tiny_config(tmp_path, positions=1 << 24)
    plot = tmp_path / "estimate.png"
    args = ["profile", "--estimate", "--model", config, "--context", str(1 << 24), "--chunk-size", "16"]
    proc = subprocess.Popen(
        [*cli_command(), *map(str, args), "--methods", "kvmerger", "--plot", str(plot)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        preexec_fn=_sigint_default,
    )
    try:
        time.sleep(8)  # torch and transformers imported, the estimate running (a million chunks)
        assert proc.poll() is None, "the estimate finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "kvcli: interrupted"
    assert out == "" and not plot.exists()
