"""Long runs say what they will do and how long it will take: the plan of an evaluation
matches the run, the ETA comes from the work done (not Rich's 30-second speed window), and
the default grids stay small."""

from __future__ import annotations

import pytest
import torch

from kvcli.cli.eta import Eta, clock_text, minutes_text, work_text
from kvcli.core import defaults
from kvcli.eval.runner import EvalSettings, SyntheticTasks, plan_eval, plan_runs, run_eval, synthetic_items
from kvcli.eval.speed import measure_speed

from conftest import tiny_eval_lm


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_eval_lm()


# ---- the ETA -------------------------------------------------------------------------------------
def test_eta_prices_what_is_left_at_the_measured_rates():
    now = [0.0]
    eta = Eta({"prefill": 4000, "answers": 4}, prior={"prefill": 0.002}, clock=lambda: now[0])
    assert eta.seconds_left() is None and eta.text() == "eta ?"  # answers: neither measured nor a prior
    eta.prior["answers"] = 1.0
    assert eta.planned_seconds() == pytest.approx(4000 * 0.002 + 4 * 1.0)
    # every step takes 100 s, far longer than Rich's 30-second speed window
    now[0] = 90.0
    eta.record("prefill", 1000)  # measured: 0.09 s per token, the prior no longer counts
    now[0] = 100.0
    eta.record("answers", 1)  # 10 s per answer
    assert eta.seconds_left() == pytest.approx(3000 * 0.09 + 3 * 10.0)
    now[0] = 130.0  # between reports the display counts down
    assert eta.text() == "eta " + clock_text(300 - 30)
    for _ in range(3):
        now[0] += 100.0
        eta.record("prefill", 1000)
        eta.record("answers", 1)
    assert eta.seconds_left() == 0.0 and eta.text() == "eta 0:00"
    assert eta.elapsed() == pytest.approx(430.0)


def test_eta_charges_all_wall_time_and_texts():
    now = [0.0]
    eta = Eta({"start": 2, "prefill": 100}, clock=lambda: now[0])
    now[0] = 5.0
    eta.record("start", 1)  # the 5 s since the run began are the first start's
    now[0] = 6.0
    eta.charge("start")  # time with no work done still counts against its kind
    assert eta.rate("start") == pytest.approx(6.0)
    assert clock_text(3725) == "1:02:05" and clock_text(65) == "1:05"
    assert minutes_text(40) == "~40 s" and minutes_text(200) == "~3 min" and minutes_text(9000) == "~2.5 h"
    assert work_text(12, [2048]) == "12 prefills of 2,048 tokens"
    assert work_text(24, [2048, 4096]) == "24 prefills of 2,048-4,096 tokens"


# ---- the plan ------------------------------------------------------------------------------------
def test_plan_matches_the_run(tiny_lm):
    items = synthetic_items(tiny_lm.tokenizer, ["niah_single"], [300], 2, seed=3)
    settings = EvalSettings(methods=["snapkv", "pod"], budgets=[0.5, 0.35], chunk_size=64, max_new_tokens=2)
    plan = plan_eval(items, settings, tiny_lm.tokenizer)
    steps, prefilled = [], []
    result = run_eval(
        tiny_lm,
        items,
        settings,
        on_step=lambda done, total, label: steps.append((done, total)),
        on_chunk=lambda done, total: prefilled.append((done, total)),
    )
    assert plan.prefills == steps[-1][0] == steps[-1][1] == len(steps) - 1
    assert plan.answers == len(result.rows)
    assert plan.runs[0] == "full" and "pod" in plan.runs and len(plan.runs) == 4  # snapkv at two budgets
    assert plan.contexts == 2 and plan.lengths == [300]
    lengths = [total for done, total in prefilled if done == total]  # each prefill's length, in order
    assert abs(sum(lengths) - plan.tokens) <= 0.05 * plan.tokens
    assert len(plan.steps) == len(lengths) == plan.prefills
    assert all(abs(n - planned) <= 0.05 * planned for n, (planned, _) in zip(lengths, plan.steps, strict=True))
    # per context: full, snapkv at 0.5 and 0.35 (scored), pod
    assert [scored for _, scored in plan.steps] == [False, True, True, False] * 2
    assert plan.scored == ("snapkv", "recon")
    assert plan.decode_tokens >= plan.answers * 2  # each answer: its budget and its reference


def test_measure_speed(tiny_lm):
    speed = measure_speed(tiny_lm, torch.arange(3, 200), chunk_size=64, raw=True)
    assert 0 < speed.prefill < 1 and 0 < speed.decode < 5 and speed.scored is None
    speed = measure_speed(tiny_lm, "some text " * 30, chunk_size=64, scored="snapkv")
    assert 0 < speed.scored < 1


def test_default_grids_are_small():
    """A bare `eval` and `profile` are sized by the work they do (planned work printed up front):
    a few minutes and about two minutes on an idle 2-core CPU at ~500 prefill tokens/s."""
    suite = SyntheticTasks()
    assert suite.kinds == ["niah_single"] and suite.samples == len(defaults.EVAL_DEPTHS)  # one needle per depth
    runs = plan_runs(EvalSettings(methods=list(defaults.HEADLINE_METHODS), budgets=[defaults.EVAL_BUDGETS]))
    contexts = len(suite.kinds) * len(suite.lengths) * suite.samples
    tokens = sum(suite.lengths) * suite.samples * len(runs)
    assert contexts * len(runs) <= 30 and tokens <= 80_000
    assert len(defaults.HEADLINE_METHODS) * defaults.PROFILE_TOKENS <= 20_000


# ---- kvcli eval --------------------------------------------------------------------------------
@pytest.mark.parametrize("full", [False, True])
def test_cli_eval_defaults_and_plan(tmp_path, monkeypatch, full):
    """A bare `kvcli eval` is the small grid (--full: every method, more samples and depths),
    and the plan is printed before the run starts."""
    from typer.testing import CliRunner

    from kvcli.cli.app import app
    from kvcli.eval import runner
    from kvcli.eval.rows import EvalResult
    from kvcli.methods import method_names

    from conftest import save_word_llama

    seen = {}

    def fake_run(lm, items, settings, on_step=None, config=None, on_chunk=None, journal=None):
        seen.update(items=items, settings=settings)
        return EvalResult(rows=[], config=dict(config or {}))

    monkeypatch.setattr(runner, "run_eval", fake_run)
    model = save_word_llama(tmp_path / "model")  # 512 positions: short lengths only
    args = ["eval", "--model", str(model), "--lengths", "200", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args + (["--full", "--tasks", "niah_single"] if full else []))
    assert result.exit_code == 0, result.output
    settings, items = seen["settings"], seen["items"]
    assert list(settings.methods) == (method_names() if full else list(defaults.HEADLINE_METHODS))
    depths = defaults.EVAL_FULL_DEPTHS if full else defaults.EVAL_DEPTHS
    assert [it.kind for it in items] == ["niah_single"] * len(depths)
    assert sorted(it.depth for it in items) == sorted(depths)
    plan = " ".join(result.stderr.split())
    runs = len(plan_runs(settings))
    assert f"Plan: {runs * len(depths)} prefills of 200 tokens" in plan and "at the speed measured now" in plan
