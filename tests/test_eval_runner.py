"""The evaluation runner, reports and ``kvcli eval``: mechanics on tiny random models,
full-cache quality on the embedded model (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcli import api
from kvcli.cli import eval as cli_eval
from kvcli.core.errors import KvcliError
from kvcli.eval import runner
from kvcli.eval.report import markdown_table, summarize, write_plots, write_results
from kvcli.eval.rows import COLUMNS, EvalRow
from kvcli.eval.runner import EvalItem, EvalSettings, question_items, run_eval, synthetic_items
from kvcli.eval.tasks import generate_task
from kvcli.methods import method_names

from conftest import CharTokenizer, tiny_eval_lm, tiny_gemma3, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_eval_lm()


def _items(lm, kinds=("niah_single", "vt"), lengths=(300,), samples=1):
    return synthetic_items(lm.tokenizer, kinds, lengths, samples, seed=3)


def test_rows_for_every_method_and_budget(tiny_lm, tmp_path):
    items = _items(tiny_lm, kinds=("niah_single", "fwe"))
    methods = method_names()
    steps = []
    res = run_eval(
        tiny_lm,
        items,
        EvalSettings(methods=methods, budgets=["0.5", "100"], chunk_size=64, max_new_tokens=4),
        on_step=lambda d, t, label: steps.append((d, t)),
    )
    runs = [("full", "1"), ("pod", "1")]  # plain pod keeps every token: one run whatever the budgets
    # each row names the allocation its method ran: methods that rank entries their own (the
    # default "auto": snapkv "relative", the others "heads"), the rest (streaming, PoD with an
    # inner method) "uniform"
    own = {"h2o": "heads", "snapkv": "relative", "cam": "heads", "kvmerger": "heads"}
    runs += [(m, f"{b}:{own.get(m, 'uniform')}") for m in methods if m not in ("full", "pod") for b in ("0.5", "100")]
    assert steps[-1] == (len(items) * len(runs),) * 2
    assert len(res.rows) == len(items) * len(runs)
    got = {(r.kind, r.method, r.budget) for r in res.rows}
    assert got == {(it.kind, m, b) for it in items for m, b in runs}
    for r in res.rows:
        assert set(COLUMNS) <= set(r.as_dict())
        assert 0.0 <= r.score <= 1.0 and r.prefill_seconds > 0
        if r.method == "full":
            assert r.logprob_delta == 0.0 and r.kv_ratio == pytest.approx(1.0)
        else:
            assert r.kv_ratio > 0
    assert min(r.kv_ratio for r in res.rows if r.method == "streaming") < 0.6  # really compressed
    # full cache first in the summary; % of full is 100 for itself
    summary = summarize(res.rows)
    assert summary[0].label == "full" and len(summary) == len(runs)
    assert set(summary[0].scores) == {"niah_single", "fwe"}

    paths = write_results(res, tmp_path / "out", command="kvcli eval --test")
    with open(paths["csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(res.rows) and list(table[0])[: len(COLUMNS)] == list(COLUMNS)
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(res.rows) and data["summary"][0]["method"] == "full"
    assert data["config"]["methods"][0] == "full"
    md = paths["md"].read_text()
    assert md.startswith("| method@budget |") and "kvcli eval --test" in md
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


FACTORIES = {"llama-mqa": lambda: tiny_llama(num_kv_heads=1), "gemma3": lambda: tiny_gemma3()}
# PoD shares the keys of distant tokens across layers whatever the budget (the budget only
# drives its inner method), so it is not lossless at budget 1.0; see the eval report.
_NOT_LOSSLESS = pytest.mark.xfail(reason="pod shares distant keys even at budget 1.0", strict=True)


@pytest.fixture(scope="module")
def full_budget_rows():
    """Rows of one run per tiny model: every method at budget 1.0 (computed once)."""
    cache = {}

    def get(model: str):
        if model not in cache:
            lm = api.wrap_model(FACTORIES[model](), CharTokenizer())
            cache[model] = run_eval(
                lm, _items(lm), EvalSettings(methods=method_names(), budgets=[1.0], chunk_size=64, max_new_tokens=2)
            ).rows
        return cache[model]

    return get


@pytest.mark.parametrize("model", list(FACTORIES))
@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=_NOT_LOSSLESS) if m.startswith("pod") else m for m in method_names() if m != "full"],
)
def test_logprob_identical_at_full_budget(full_budget_rows, model, method):
    """At budget 1.0 a method keeps everything: the answer likelihood must be the full
    cache's, on every task (several chunks, so compress ran after each)."""
    rows = full_budget_rows(model)
    full = {r.kind: r.logprob for r in rows if r.method == "full"}
    mine = [r for r in rows if r.method == method]
    assert {r.kind for r in mine} == set(full) == {"niah_single", "vt"}
    for r in mine:
        assert r.logprob == pytest.approx(full[r.kind], abs=1e-6)
        assert abs(r.logprob_delta) <= 1e-6


def test_questions_share_one_prefill(tiny_lm, tmp_path):
    doc = "The cat sat on the mat. " * 30
    q = tmp_path / "q.jsonl"
    q.write_text(
        '{"question": "Where did the cat sit?", "answer": "on the mat"}\n\n'
        '{"question": "Which animals?", "answers": ["cat", "dog"], "metric": "all"}\n'
    )
    items = question_items(doc, str(q), tiny_lm.tokenizer)
    assert [it.reference for it in items] == ["on the mat", "cat, dog"]
    steps = []
    res = run_eval(
        tiny_lm,
        items,
        EvalSettings(methods=["streaming"], budgets=[0.5], chunk_size=64, max_new_tokens=2),
        on_step=lambda d, t, label: steps.append(t),
    )
    assert steps[-1] == 2 and len(res.rows) == 4  # 2 prefills (full, streaming), 2 questions each
    steps.clear()
    run_eval(
        tiny_lm,
        items,
        EvalSettings(methods=["snapkv"], budgets=[0.5], chunk_size=64, scorings=["question"], max_new_tokens=2),
        on_step=lambda d, t, label: steps.append(t),
    )
    assert steps[-1] == 3  # the full cache once for the context; query-aware snapkv once per question


def test_validation_errors():
    with pytest.raises(KvcliError, match="unknown method"):
        runner.validate_methods(["nope"], ["0.5"])
    with pytest.raises(KvcliError, match="invalid budget"):
        runner.validate_methods(["h2o"], ["zero"])
    with pytest.raises(KvcliError, match="none of the chosen methods"):
        runner.validate_methods(["h2o", "kvmerger"], ["0.5"], {"nonsense": 0.8})
    _, _, per = runner.validate_methods(["h2o", "kvmerger"], ["0.5"], {"kvmerger.threshold": 0.8, "n_sink": 2})
    assert per == {"h2o": {"n_sink": 2}, "kvmerger": {"threshold": 0.8, "n_sink": 2}}
    # a plain key goes to the methods that have it: threshold is KVMerger's only
    _, _, per = runner.validate_methods(["h2o", "kvmerger"], ["0.5"], {"threshold": 0.8})
    assert per == {"h2o": {}, "kvmerger": {"threshold": 0.8}}
    assert cli_eval.parse_lengths("2K,4096") == [2048, 4096]
    with pytest.raises(KvcliError):
        cli_eval.parse_lengths("2x")
    with pytest.raises(KvcliError, match="unknown task kind"):
        cli_eval.parse_kinds("niah_single,nope")


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        EvalRow(
            kind="niah_single",
            length=n,
            depth=d,
            sample=0,
            method=m,
            budget=b,
            scoring=None,
            score=1.0 if m == "full" or d < 0.5 else 0.0,
            logprob=-1.0,
            logprob_delta=0.0,
            kv_ratio=float(b),
            prefill_seconds=1.0,
        )
        for m, b in (("full", "1"), ("h2o", "0.5"), ("h2o", "0.35"))
        for n in (1024, 2048)
        for d in (0.1, 0.9)
    ]
    paths = write_plots(rows, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    # one heatmap grid for every run, and the two plots against budget
    assert names == ["logprob_delta.png", "needle_heatmaps.png", "score_vs_budget.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "| h2o@0.5 | 50.0 | 50.0 |" in markdown_table(rows)


def _kvcli_in_process(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from kvcli.cli.app import main

    monkeypatch.setattr(sys, "argv", ["kvcli", "eval", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_errors(tmp_path, monkeypatch, capsys):
    """Bad input is one line on stderr and exit code 2, before any model loads."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n')
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Q?", "answer": "A"}\n')
    out = str(tmp_path / "o")
    # the real command line, once: exit status and stderr as a user sees them
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("kvcli")),
            "eval",
            str(doc),
            "--questions",
            str(tmp_path / "missing.jsonl"),
            "--out",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "cannot read questions file" in proc.stderr
    cases = [
        ((str(tmp_path / "missing.txt"), "--questions", str(bad)), 'missing "answer"'),
        ((str(tmp_path / "missing.txt"), "--questions", str(tmp_path / "q.jsonl")), "cannot read questions file"),
        ((str(tmp_path / "missing.txt"), "--questions", str(good)), "missing.txt"),
        ((str(doc),), "needs --questions"),
        (("--questions", str(bad)), "needs the DOCUMENT"),
        ((str(doc), "--questions", str(bad), "--lengths", "2K"), "only apply to the synthetic tasks"),
        (("--methods", "nope"), "unknown method"),
        (("--budgets", "0"), "invalid budget"),
        (("--lengths", "64", "--tasks", "niah_single"), "too small"),
        (("--tasks", "needle"), "unknown task kind"),
    ]
    for args, message in cases:
        code, stdout, stderr = _kvcli_in_process(monkeypatch, capsys, *args, "--out", out)
        lines = stderr.strip().splitlines()
        assert code == 2, (args, stderr)
        assert len(lines) == 1 and message in lines[0], (args, stderr)
        assert stdout == ""
    assert not Path(out).exists()  # nothing was created for a run that never started


@pytest.mark.slow
def test_embedded_full_cache_finds_single_needles():
    """The reference must be good for the comparison to mean anything: with the full cache
    the embedded model retrieves one planted number at several depths."""
    lm = api.load_model(quiet=True)
    tasks = [
        generate_task("niah_single", lm.tokenizer, n, seed=s, depth=d)
        for n, s, d in ((1024, 1, 0.1), (1536, 2, 0.4), (2048, 3, 0.7), (1024, 4, 0.95))
    ]
    res = run_eval(lm, runner.items_from_tasks(tasks), EvalSettings(methods=[]))
    scores = [r.score for r in res.rows]
    assert len(scores) == 4
    assert sum(scores) / len(scores) >= 0.75, [(r.depth, r.answers, r.prediction) for r in res.rows]


def test_item_reference():
    it = EvalItem(kind="x", context="c", question="q", answers=["a", "b"], metric="all")
    assert it.reference == "a, b"
    it.metric = "any"
    assert it.reference == "a"
