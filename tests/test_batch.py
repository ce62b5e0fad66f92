"""``kvcli batch`` (issue 18): documents found the same way every time, one whole JSON line
per document, bad documents recorded while the run goes on, exit status, resume by content
and settings, a kill -9 that leaves only whole lines, worker processes and Ray giving the
answers one worker gives, ``--kv-memory``.

A tiny random Llama saved to a temporary directory stands in for the model (never the
embedded one); runs go through ``main()`` in this process where they can, a real process
only where a signal must reach one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kvcli.batch.discover import discover
from kvcli.batch.results import ResultsWriter, done_keys, read_results
from kvcli.batch.spec import BatchSpec, load_questions_file, parse_size
from kvcli.cli.batch import ray_argv
from kvcli.core import defaults
from kvcli.core.budget import parse_budget
from kvcli.core.errors import KvcliError
from kvcli.methods import make_method

from conftest import WORDS, make_pdf, save_word_llama
from test_cli import assert_one_line_error, cli_command, run_cli

# "0.5" as reports write it for snapkv with the default allocation ("auto": snapkv's own, "0.5:relative")
DEFAULT_HALF = str(make_method("snapkv").budget_for(parse_budget("0.5", defaults.ALLOCATION)))

FAST = ["--max-new-tokens", "3", "-m", "snapkv", "-b", "0.5", "--scoring", "window"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_word_llama(tmp_path_factory.mktemp("batch-llama"), layers=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process, as each worker process gets on 2 cores: on a loaded
    machine 2 threads spin against each other (measured: 1.2 s per tiny document, 0.02 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCLI_") or k == "KVCLI_CACHE_DIR"}
    config = tmp_path / "empty.toml"
    config.write_text("", encoding="utf-8")
    env["KVCLI_CONFIG"] = str(config)
    return env


@pytest.fixture
def cli(capfd, monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("KVCLI_") and key != "KVCLI_CACHE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.setenv("KVCLI_CONFIG", _env(tmp_path)["KVCLI_CONFIG"])
    return lambda *args: run_cli([str(a) for a in args], capfd, monkeypatch)


def words_doc(path: Path, seed: int, n: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(WORDS[(seed * 7 + i * (seed + 1)) % len(WORDS)] for i in range(n)), encoding="utf-8")
    return path


def lines_of(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n"), "the results file ends in a cut-off line"
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def documents(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in rows if r["kind"] == "document"}


# --------------------------------------------------------------------------- no model: discovery, key, file
def test_discover_files_folders_globs_in_a_stable_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("b/2.txt", "b/1.md", "b/sub/3.pdf", "b/.hidden/4.txt", "b/skip.bin", "a.txt", "c/x.html"):
        words_doc(tmp_path / name, 1)
    found = discover(["a.txt", "b", "c/*.html", "b/1.md", "./a.txt"])
    assert found == ["a.txt", "b/1.md", "b/2.txt", "b/sub/3.pdf", "c/x.html"]  # each once, folders sorted
    assert discover(["b/**/*.pdf"]) == ["b/sub/3.pdf"]
    assert discover(["b/skip.bin"]) == ["b/skip.bin"]  # named explicitly: any extension


@pytest.mark.parametrize(
    "names, needle",
    [([], "no documents"), (["missing.txt"], "no such file"), (["empty"], "no documents"), (["*.nope"], "match")],
)
def test_discover_errors(tmp_path, monkeypatch, names, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvcliError, match=needle):
        discover(names)


def test_settings_key_follows_what_changes_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    base = BatchSpec(model="m", method="snapkv", budget="0.5", questions=("q",))
    assert base.key() == BatchSpec(model=str(tmp_path / "m"), method="snapkv", budget="0.5", questions=("q",)).key()
    assert base.key() == BatchSpec(model="m", method="snapkv", budget="0.5", questions=("q",), device="cpu").key()
    for other in (
        BatchSpec(model="m", method="snapkv", budget="0.35", questions=("q",)),
        BatchSpec(model="m", method="snapkv", budget="0.5", questions=("q", "r")),
        BatchSpec(model="m", method="snapkv", budget="0.5"),  # summarize
        BatchSpec(model="m", method="snapkv", budget="0.5", questions=("q",), max_new_tokens=5),
    ):
        assert other.key() != base.key()


def test_results_file_drops_a_cut_off_line_and_refuses_others(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = json.dumps({"kind": "document", "sha256": "ab", "settings": "k", "answers": []}) + "\n"
    failed = json.dumps({"kind": "document", "sha256": "cd", "settings": "k", "error": "bad"}) + "\n"
    path.write_text(whole + failed + '{"kind": "docu', encoding="utf-8")
    with ResultsWriter(path) as out:
        assert out.cut_bytes == len('{"kind": "docu')
        assert done_keys(out.previous) == {("ab", "k")}  # the failed one runs again
        with pytest.raises(KvcliError, match="in use"):  # one writer per file
            ResultsWriter(path).__enter__()
        out.write({"kind": "summary", "text": "é"})
    assert [r["kind"] for r in lines_of(path)] == ["document", "document", "summary"]
    assert read_results(path)[1] == path.stat().st_size
    for foreign in ("not json\n", '{"a": 1}\n', "a text without a newline"):
        path.write_text(foreign, encoding="utf-8")
        with pytest.raises(KvcliError, match="kvcli batch results file"):
            ResultsWriter(path).__enter__()
        assert path.read_text(encoding="utf-8") == foreign  # untouched


def test_sizes_questions_and_the_ray_flag(tmp_path):
    assert parse_size("200MB") == 200_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size("4096") == 4096
    for bad in ("lots", "-5MB", "0", "12XB"):
        with pytest.raises(KvcliError, match="--kv-memory"):
            parse_size(bad)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "Who?", "answer": "x"}\n\n"When?"\n', encoding="utf-8")
    assert load_questions_file(qa) == ["Who?", "When?"]
    qa.write_text('{"question": ""}\n', encoding="utf-8")
    with pytest.raises(KvcliError, match="line 1"):
        load_questions_file(qa)
    assert ray_argv(["batch", "d", "--ray"]) == ["batch", "d", "--ray=local"]
    assert ray_argv(["batch", "--ray", "d.txt"]) == ["batch", "--ray=local", "d.txt"]
    assert ray_argv(["batch", "d", "--ray", "auto"]) == ["batch", "d", "--ray", "auto"]
    assert ray_argv(["batch", "d", "--ray", "10.0.0.1:6379"]) == ["batch", "d", "--ray", "10.0.0.1:6379"]
    assert ray_argv(["ask", "--ray"]) == ["ask", "--ray"]


# --------------------------------------------------------------------------- usage errors: before torch, exit 2
USAGE = {
    "nothing to do": (["{doc}"], ["--ask", "--summarize"]),
    "ask and summarize": (["{doc}", "--ask", "q", "--summarize"], ["--summarize", "choose one"]),
    "no documents matched": (["{tmp}/*.nothing", "--ask", "q"], ["match"]),
    "bad questions file": (["{doc}", "--questions", "{doc}"], ["questions file", "line 1"]),
    "bad kv-memory": (["{doc}", "--ask", "q", "--kv-memory", "lots"], ["--kv-memory", "lots"]),
    "kv-memory and budget": (["{doc}", "--ask", "q", "--kv-memory", "1MB", "-b", "0.5"], ["--budget"]),
    "kv-memory with full": (["{doc}", "--ask", "q", "--kv-memory", "1MB"], ["--kv-memory", "full"]),
    "workers 0": (["{doc}", "--ask", "q", "--workers", "0"], ["--workers"]),
    "results file not ours": (["{doc}", "--ask", "q", "--output", "{doc}"], ["kvcli batch results file"]),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_usage_errors_exit_2(cli, tmp_path, case):
    doc = words_doc(tmp_path / "doc.txt", 0)
    args, needles = USAGE[case]
    res = cli("batch", *[a.format(doc=doc, tmp=tmp_path) for a in args])
    assert res.code == 2, (res.code, res.err)
    assert_one_line_error(res, *needles)
    assert res.out == ""


# --------------------------------------------------------------------------- runs on the tiny model
def test_bad_documents_are_lines_and_a_rerun_skips_what_is_done(cli, tmp_path, tiny_model):
    docs = tmp_path / "docs"
    for i in range(3):
        words_doc(docs / f"good{i}.txt", i)
    (docs / "corrupt.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    (docs / "locked.pdf").write_bytes(make_pdf(["secret"], password="pw"))
    (docs / "empty.md").write_text(" \n", encoding="utf-8")
    words_doc(docs / "long.txt", 5, n=600)  # past the model's 512 positions
    out = tmp_path / "r.jsonl"
    res = cli("batch", docs, "--ask", "w1 w2", "--model", tiny_model, "--output", out, *FAST)
    assert res.code == 3, res.err  # some documents failed; the run went on
    rows = lines_of(out)
    assert rows[-1]["kind"] == "summary" and (rows[-1]["done"], rows[-1]["failed"]) == (3, 4)
    got = documents(rows)
    assert set(got) == {"good0.txt", "good1.txt", "good2.txt", "corrupt.pdf", "locked.pdf", "empty.md", "long.txt"}
    for name, needle in (("corrupt.pdf", "pdf"), ("locked.pdf", "encrypted"), ("empty.md", "empty")):
        assert needle in got[name]["error"].lower() and "\n" not in got[name]["error"]
    assert "--truncate" in got["long.txt"]["error"]
    good = got["good0.txt"]
    assert good["answers"][0]["question"] == "w1 w2" and "error" not in good
    assert good["context_tokens"] > 60 and good["kv_bytes"] < good["kv_bytes_full"]
    assert good["method"] == "snapkv" and good["budget"] == DEFAULT_HALF and len(good["sha256"]) == 64
    assert "batch: 3 done, 4 failed" in res.err

    # The same command again: the good ones are skipped (same content, same settings), the failed ones retried.
    res = cli("batch", docs, "--ask", "w1 w2", "--model", tiny_model, "--output", out, *FAST)
    assert res.code == 3
    summary = lines_of(out)[-1]
    assert (summary["done"], summary["failed"], summary["skipped"]) == (0, 4, 3)

    # A new document and a renamed copy of a done one: only the new one runs.
    words_doc(docs / "good9.txt", 9)
    (docs / "good0.txt").rename(docs / "renamed.txt")
    for bad in ("corrupt.pdf", "locked.pdf", "empty.md", "long.txt"):
        (docs / bad).unlink()
    res = cli("batch", docs, "--ask", "w1 w2", "--model", tiny_model, "--output", out, *FAST)
    assert res.code == 0, res.err
    summary = lines_of(out)[-1]
    assert (summary["done"], summary["failed"], summary["skipped"]) == (1, 0, 3)
    assert lines_of(out)[-2]["path"].endswith("good9.txt")


def test_summarize_questions_file_and_stdout(cli, tmp_path, tiny_model):
    doc = words_doc(tmp_path / "d.txt", 2)
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "w3 w4"}\n{"question": "w5"}\n', encoding="utf-8")
    res = cli("batch", doc, "--questions", qa, "--model", tiny_model, *FAST)
    assert res.code == 0, res.err
    rows = [json.loads(line) for line in res.out.splitlines()]  # no --output: the lines on stdout
    assert [a["question"] for a in rows[0]["answers"]] == ["w3 w4", "w5"] and rows[1]["kind"] == "summary"
    res = cli("batch", doc, "--summarize", "--model", tiny_model, "-q", *FAST)
    assert res.code == 0, res.err
    row = json.loads(res.out.splitlines()[0])
    assert isinstance(row["summary"], str) and "answers" not in row


def test_kv_memory_chooses_the_budget(cli, tmp_path, tiny_model):
    # The tiny Llama: 2 layers, 2 KV heads of 8 dims, float32 -> 128 bytes of K and V per token
    # per layer, plus up to 20 bytes of metadata per head: 2 * (128 + 40) = 336 bytes per token.
    doc = words_doc(tmp_path / "d.txt", 3)
    out = tmp_path / "r.jsonl"
    common = ["--ask", "w1", "--model", tiny_model, "--output", out, "-m", "snapkv", "--max-new-tokens", "2"]
    res = cli("batch", doc, *common, "--kv-memory", str(336 * 20))
    assert res.code == 0, res.err
    row = lines_of(out)[0]
    assert row["budget"] == "20:relative" and row["kv_memory"] == 336 * 20 and row["kv_memory_fits"] is True
    assert row["kv_bytes"] <= 336 * 20 < row["kv_bytes_full"]
    res = cli("batch", doc, *common, "--kv-memory", str(336 * 3))
    assert res.code == 3
    assert "holds 3 entries per layer" in lines_of(out)[-2]["error"]


def test_save_contexts_for_a_later_ask(cli, tmp_path, tiny_model):
    doc = words_doc(tmp_path / "d.txt", 4)
    out, folder = tmp_path / "r.jsonl", tmp_path / "contexts"
    args = ["batch", doc, "--ask", "w1 w2", "--model", tiny_model, "--output", out, *FAST]
    assert cli(*args, "--save-contexts", folder).code == 0
    row = lines_of(out)[0]
    saved = Path(row["context_file"])
    assert saved.parent == folder and saved.stat().st_size == row["context_file_bytes"]
    res = cli("ask", saved, "w1 w2", "--model", tiny_model, "--max-new-tokens", "3", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["answers"] == row["answers"]  # the saved context answers as the batch did
    saved.unlink()  # done, but its context is gone: a rerun that saves contexts runs it again
    assert cli(*args).code == 0 and lines_of(out)[-1]["skipped"] == 1
    assert cli(*args, "--save-contexts", folder).code == 0 and lines_of(out)[-1]["done"] == 1
    assert saved.is_file()


def test_ctrl_c_exits_130_with_whole_lines(cli, tmp_path, tiny_model, monkeypatch):
    from kvcli.batch import work

    for i in range(4):
        words_doc(tmp_path / "docs" / f"d{i}.txt", i)
    real, calls = work.Worker.run, []

    def interrupted_third(self, task):
        calls.append(task.path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, task)

    monkeypatch.setattr(work.Worker, "run", interrupted_third)
    out = tmp_path / "r.jsonl"
    res = cli("batch", tmp_path / "docs", "--ask", "w1", "--model", tiny_model, "--output", out, *FAST)
    assert res.code == 130 and res.err.strip().splitlines()[-1] == "kvcli: interrupted"
    assert [r["kind"] for r in lines_of(out)] == ["document", "document"]  # no summary, nothing half


def test_kill_9_workers_2_then_resume_matches_one_worker(cli, tmp_path, tiny_model):
    """A 2-worker run killed with SIGKILL leaves whole lines only and its workers go; a rerun
    finishes the rest; every answer equals what one worker (this process) gives."""
    docs = tmp_path / "docs"
    for i in range(24):
        words_doc(docs / f"d{i:02d}.txt", i, n=200)  # slow enough to be killed mid-run
    out = tmp_path / "r.jsonl"
    args = ["batch", str(docs), "--ask", "w1 w2", "--model", str(tiny_model), "--output", str(out), "--workers", "2"]
    proc = subprocess.Popen(
        [*cli_command(), *args, *FAST, "-q"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(tmp_path),
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    rows = lines_of(out)
    assert rows and all(r["kind"] == "document" and "error" not in r for r in rows), rows
    assert len(rows) < 24  # killed mid-run
    deadline = time.monotonic() + 20  # orphaned workers notice the driver is gone and exit
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.2)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]

    res = cli(*args[:-2], *FAST, "-q")  # one worker, in this process: only what is left
    assert res.code == 0, res.err
    resumed = lines_of(out)
    assert resumed[-1]["skipped"] == len(rows) and resumed[-1]["done"] == 24 - len(rows)
    one = tmp_path / "one.jsonl"
    args[args.index(str(out))] = str(one)
    assert cli(*args[:-2], *FAST, "-q").code == 0
    assert {k: r["answers"] for k, r in documents(resumed).items()} == {
        k: r["answers"] for k, r in documents(lines_of(one)).items()
    }


def test_ray_actors_give_the_answers_of_one_worker(cli, tmp_path, tiny_model):
    ray = pytest.importorskip("ray")
    for i in range(4):
        words_doc(tmp_path / "docs" / f"d{i}.txt", i)
    common = ["batch", tmp_path / "docs", "--ask", "w1 w2", "--model", tiny_model, *FAST, "-q"]
    res = cli(*common, "--output", tmp_path / "one.jsonl")
    assert res.code == 0, res.err
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = cli(*common, "--output", tmp_path / "ray.jsonl", "--workers", "2", "--ray")
    finally:
        ray.shutdown()
    assert res.code == 0, res.err
    rows = lines_of(tmp_path / "ray.jsonl")
    assert rows[-1]["runner"] == "ray" and rows[-1]["workers"] == 2
    assert len({r["worker"] for r in rows[:-1]}) == 2  # both actors worked
    one = documents(lines_of(tmp_path / "one.jsonl"))
    assert {k: r["answers"] for k, r in documents(rows).items()} == {k: r["answers"] for k, r in one.items()}
