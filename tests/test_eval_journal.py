"""kvcli eval's journal: finished prefills kept on disk, a cut-off run resumed, the full
cache's rows reused by a later run with other methods, and nothing reused that would differ."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kvcli import api
from kvcli.core.errors import KvcliError
from kvcli.eval import journal as journal_mod
from kvcli.eval.journal import Journal
from kvcli.eval.runner import EvalSettings, plan_eval, reused_steps, run_eval, step_keys, synthetic_items

from conftest import CharTokenizer, tiny_eval_lm, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_eval_lm()


@pytest.fixture(scope="module")
def items(tiny_lm):
    return synthetic_items(tiny_lm.tokenizer, ["niah_single"], [260], 2, seed=5)


def _settings(methods, **kw):
    return EvalSettings(methods=methods, budgets=[0.5], chunk_size=64, max_new_tokens=3, **kw)


def _measured(rows):
    """What a row says about the method (its timing aside)."""
    return [replace(r, prefill_seconds=None) for r in rows]


def _run(lm, items, settings, journal=None):
    labels = []
    result = run_eval(lm, items, settings, on_step=lambda d, t, label: labels.append(label), journal=journal)
    return result, labels[:-1]  # the last call is "done"


def test_a_rerun_takes_everything_from_the_journal(tiny_lm, items, tmp_path):
    settings = _settings(["snapkv"])
    with Journal(tmp_path) as journal:
        first, ran = _run(tiny_lm, items, settings, journal)
    assert len(ran) == 4  # two contexts x (full, snapkv)
    lines = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == ["full", "snapkv/recon@0.5:relative"] * 2
    assert all(line["kind"] == "prefill" and len(line["rows"]) == 1 for line in lines)

    with Journal(tmp_path) as journal:
        assert len(journal) == 4
        assert reused_steps(tiny_lm, items, settings, journal) == [True] * 4
        plan = plan_eval(items, settings, tiny_lm.tokenizer, reused=reused_steps(tiny_lm, items, settings, journal))
        assert (plan.prefills, plan.tokens, plan.answers, plan.reused) == (0, 0, 0, 4)
        again, ran = _run(tiny_lm, items, settings, journal)
    assert ran == [] and again.rows == first.rows  # timings included: these are the same rows
    assert again.config["reused_prefills"] == 4 and again.config["prefills"] == 4
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 4  # nothing appended

    with Journal(tmp_path, reuse=False) as journal:  # --rerun
        third, ran = _run(tiny_lm, items, settings, journal)
    assert len(ran) == 4 and _measured(third.rows) == _measured(first.rows)
    assert len((tmp_path / "journal.jsonl").read_text().splitlines()) == 8


def test_other_methods_reuse_the_full_cache_and_match_a_fresh_run(tiny_lm, items, tmp_path):
    with Journal(tmp_path) as journal:
        _run(tiny_lm, items, _settings(["snapkv"]), journal)
    with Journal(tmp_path) as journal:
        plan = plan_eval(
            items,
            _settings(["h2o", "snapkv"]),
            tiny_lm.tokenizer,
            reused=reused_steps(tiny_lm, items, _settings(["h2o", "snapkv"]), journal),
        )
        assert plan.prefills == 2 and plan.reused == 4  # only h2o runs, on each context
        mixed, ran = _run(tiny_lm, items, _settings(["h2o", "snapkv"]), journal)
    assert ran == [f"niah_single 260 h2o/recon@{s}" for s in ("0.5:heads", "0.5:heads")]
    fresh, _ = _run(tiny_lm, items, _settings(["h2o", "snapkv"]))  # an independent run, no journal
    assert _measured(mixed.rows) == _measured(fresh.rows)
    h2o = [r for r in mixed.rows if r.method == "h2o"]
    full = [r for r in mixed.rows if r.method == "full"]
    for a, f in zip(h2o, full, strict=True):  # the delta is against the reused full cache's likelihood
        assert a.logprob_delta == pytest.approx(a.logprob - f.logprob)


def test_a_run_cut_off_resumes_where_it_stopped(tiny_lm, items, tmp_path):
    settings = _settings(["snapkv"])
    whole, _ = _run(tiny_lm, items, settings)

    class Stop(Exception):
        pass

    def stop_at_third(done, total, label):
        if done == 2:
            raise Stop

    with pytest.raises(Stop), Journal(tmp_path) as journal:
        run_eval(tiny_lm, items, settings, on_step=stop_at_third, journal=journal)
    path = tmp_path / "journal.jsonl"
    assert len(path.read_text().splitlines()) == 2
    path.write_bytes(path.read_bytes() + b'{"kind": "prefill", "key": "ab')  # and a write cut off by a kill
    with Journal(tmp_path) as journal:
        assert journal.cut_bytes == len('{"kind": "prefill", "key": "ab') and len(journal) == 2
        resumed, ran = _run(tiny_lm, items, settings, journal)
    assert len(ran) == 2 and _measured(resumed.rows) == _measured(whole.rows)
    assert len(path.read_text().splitlines()) == 4


def test_journal_lines_name_the_options_that_ran(tiny_lm, items, tmp_path):
    """Two runs of one method with different -o options in one --out: the rows alone are
    alike (method, budget, scoring), so each line names its options; none without -o."""
    with Journal(tmp_path) as journal:
        _run(tiny_lm, items, _settings(["snapkv"]), journal)
        _run(tiny_lm, items, _settings(["snapkv"], method_options={"kernel": 3}), journal)
    lines = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    snap = [line for line in lines if line["label"] != "full"]
    assert len(snap) == 4 and len(lines) == 6  # the second run reused the full cache's lines
    assert [line.get("options") for line in snap] == [None, None, {"kernel": 3}, {"kernel": 3}]
    assert all("options" not in line for line in lines if line["label"] == "full")


def test_keys_change_with_what_changes_the_answers(tiny_lm, items, monkeypatch):
    base = step_keys(tiny_lm, items, _settings(["snapkv"]))
    assert len(set(base)) == 4  # every prefill its own key
    assert step_keys(tiny_lm, items, _settings(["snapkv"])) == base  # stable
    run_level = [  # the settings of every prefill: the full cache's keys change too
        EvalSettings(methods=["snapkv"], budgets=[0.5], chunk_size=32, max_new_tokens=3),
        EvalSettings(methods=["snapkv"], budgets=[0.5], chunk_size=64, max_new_tokens=4),
        _settings(["snapkv"], truncate=True),
        _settings(["snapkv"], backend="eager"),
    ]
    method_level = [  # the method's: the full cache's rows are reused
        _settings(["snapkv"], method_options={"kernel": 3}),
        _settings(["snapkv"], scorings=["window"]),
        EvalSettings(methods=["snapkv"], budgets=[0.35], chunk_size=64, max_new_tokens=3),
    ]
    for settings in run_level + method_level:
        keys = step_keys(tiny_lm, items, settings)
        assert not set(keys[1::2]) & set(base), settings  # the snapkv prefills are new
        assert (keys[0::2] == base[0::2]) == (settings in method_level), settings
    # another build of kvcli (or torch, transformers) reuses nothing
    real = journal_mod.code_identity()
    monkeypatch.setattr(journal_mod, "code_identity", lambda: {**real, "kvcli": "0" * 64})
    assert not set(step_keys(tiny_lm, items, _settings(["snapkv"]))) & set(base)
    monkeypatch.undo()
    # another model: the same architecture, other weights
    other = api.wrap_model(tiny_llama(num_kv_heads=2, seed=1), CharTokenizer())
    assert not set(step_keys(other, items, _settings(["snapkv"]))) & set(base)


def test_code_identity_covers_kvcli_sources():
    ident = journal_mod.code_identity()
    assert len(ident["kvcli"]) == 64 and ident["torch"] == torch.__version__


def test_pod_keys_follow_the_files_it_picks_up(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path))
    assert journal_mod.cache_files_identity("snapkv") is None
    before = journal_mod.cache_files_identity("pod")
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "m.json").write_text("{}")
    assert journal_mod.cache_files_identity("pod+kvmerger") != before


def test_a_foreign_or_busy_journal_is_refused_untouched(tmp_path):
    path = tmp_path / "journal.jsonl"
    for foreign in ("not json\n", '{"a": 1}\n', "text without a newline"):
        path.write_text(foreign)
        with pytest.raises(KvcliError, match="kvcli eval journal"):
            Journal(tmp_path).__enter__()
        assert path.read_text() == foreign
    path.unlink()
    with Journal(tmp_path):
        with pytest.raises(KvcliError, match="in use by another kvcli eval run"):
            Journal(tmp_path).__enter__()
    # lines of another version (rows it cannot read) are skipped, not an error
    path.write_text(json.dumps({"kind": "prefill", "key": "k", "rows": [{"odd": 1}]}) + "\n")
    with Journal(tmp_path) as journal:
        assert len(journal) == 0 and journal.get("k") is None


def test_cli_resumes_from_the_journal(tmp_path):
    """The command line: a second run in the same --out takes everything from the journal and
    writes the same results; --rerun runs it all again."""
    from typer.testing import CliRunner

    from kvcli.cli.app import app

    from conftest import save_word_llama

    model = save_word_llama(tmp_path / "model")
    out = tmp_path / "out"
    args = ["eval", "--model", str(model), "--lengths", "200", "--samples", "1", "--tasks", "niah_single"]
    args += ["--depths", "0.5", "--methods", "snapkv", "--out", str(out), "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(app, [*args[:-1]])  # not --json: the notes are printed
    assert second.exit_code == 0, second.output
    assert "2 of 2 prefills are in" in " ".join(second.stderr.split())
    rows = lambda: json.loads((out / "results.json").read_text())["rows"]  # noqa: E731
    assert rows() == json.loads(first.stdout)["rows"]
    third = CliRunner().invoke(app, [*args, "--rerun"])
    assert third.exit_code == 0, third.output
    assert [r["prediction"] for r in json.loads(third.stdout)["rows"]] == [r["prediction"] for r in rows()]
    assert len((out / "journal.jsonl").read_text().splitlines()) == 4
