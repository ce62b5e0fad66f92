"""Methods as dataclasses: options from fields, checked when made (before any model loads),
old option names as aliases, and what ``KEY`` / ``METHOD.KEY`` mean for one or several methods."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from kvcli import api
from kvcli.api import settings
from kvcli.cli.app import app, main
from kvcli.core.errors import KvcliError
from kvcli.methods import REGISTRY, Method, make_method, method_names, split_options
from kvcli.methods.base import NOT_AN_OPTION

from conftest import IdTokenizer, tiny_llama

runner = CliRunner()


@pytest.mark.parametrize("name", list(REGISTRY))
def test_options_are_the_dataclass_fields(name):
    cls = REGISTRY[name]
    assert dataclasses.is_dataclass(cls) and issubclass(cls, Method)
    fields = [f.name for f in dataclasses.fields(cls) if f.metadata != NOT_AN_OPTION]
    assert cls.option_names() == fields
    assert set(fields) <= set(make_method(name).options())


def test_hooks_are_declared_on_the_base_class():
    base = make_method("h2o")
    assert base.attach.__func__ is Method.attach and base.estimate_layers.__func__ is Method.estimate_layers
    assert make_method("pod").attach.__func__ is not Method.attach


@pytest.mark.parametrize(
    "name, options, needle",
    [
        ("kvmerger", {"threshold": "abc"}, "threshold"),
        ("kvmerger", {"threshold": 2}, "threshold"),
        ("kvmerger", {"sigma": 0}, "sigma"),
        ("kvmerger", {"recent": 0.9, "heavy": 0.5}, "heavy"),
        ("kvmerger", {"value_mode": "x"}, "value_mode"),
        ("kvmerger", {"fallback": 1}, "fallback"),
        ("h2o", {"recent": 7}, "recent"),
        ("cam", {"recent": -0.1}, "recent"),
        ("cam", {"spread": 0}, "spread"),
        ("streaming", {"n_sink": -5}, "n_sink"),
        ("streaming", {"n_sink": 2.5}, "n_sink"),
        ("h2o", {"n_sink": True}, "n_sink"),
        ("snapkv", {"kernel": 4}, "kernel"),
        ("snapkv", {"kernel": -3}, "kernel"),
        ("snapkv", {"window": "wide"}, "window"),
        ("snapkv", {"pool": "median"}, "pool"),
        ("snapkv", {"ahead": -1}, "ahead"),
        ("snapkv", {"ahead": 2, "pool": "avg"}, "ahead"),
        ("pod", {"recent_min": -1}, "recent_min"),
        ("pod", {"block_size": 0}, "block_size"),
        ("pod", {"profile": 3}, "profile"),
        ("pod+kvmerger", {"kvmerger.threshold": "x"}, "threshold"),
        ("h2o", {"nonsense": 1}, "nonsense"),
    ],
)
def test_bad_options_are_refused_when_the_method_is_made(name, options, needle):
    with pytest.raises(KvcliError) as info:
        make_method(name, **options)
    text = str(info.value)
    assert needle in text and "\n" not in text and text.split(":")[0] in name


class _Scored:
    """A layer as ``importance`` sees it: only its recorded statistics."""

    def __init__(self, obs: torch.Tensor) -> None:
        self.obs = obs

    def require(self, name: str) -> torch.Tensor:
        assert name == "obs"
        return self.obs


def test_snapkv_pooling_avg_and_max():
    obs = torch.zeros(1, 2, 9)
    obs[0, 0, 4] = 1.0  # one sharp score in head 0; head 1 all equal
    obs[0, 1] = 0.5
    avg = make_method("snapkv", pool="avg").importance(_Scored(obs))
    top = make_method("snapkv", ahead=0).importance(_Scored(obs))  # max is the default
    # avg: the peak is shared with its neighbours (1/5 each), edges averaged over the window only
    assert torch.allclose(avg[0, 0], torch.tensor([0, 0, 0.2, 0.2, 0.2, 0.2, 0.2, 0, 0]))
    # max: every entry within kernel // 2 = 2 of the peak scores as high as the peak
    assert torch.equal(top[0, 0], torch.tensor([0, 0, 1.0, 1, 1, 1, 1, 0, 0]))
    assert torch.allclose(avg[0, 1], obs[0, 1]) and torch.equal(top[0, 1], obs[0, 1])
    assert torch.equal(make_method("snapkv", kernel=1, ahead=0).importance(_Scored(obs)), obs)


def test_snapkv_ahead_lifts_the_entries_before_a_peak():
    obs = torch.zeros(1, 1, 12)
    obs[0, 0, 7] = 1.0
    obs[0, 0, 8] = 0.5
    assert make_method("snapkv").ahead == 2 and make_method("snapkv", pool="avg").ahead == 0  # the defaults
    ahead = make_method("snapkv").importance(_Scored(obs))[0, 0]
    # the window of entry i is [i - 2, i + 4]: 3..9 see the peak, 10 sees 0.5, 11 nothing
    assert torch.equal(ahead, torch.tensor([0, 0, 0, 1.0, 1, 1, 1, 1, 1, 1, 0.5, 0]))
    centred = make_method("snapkv", ahead=0).importance(_Scored(obs))[0, 0]
    assert torch.equal(centred, torch.tensor([0, 0, 0, 0, 0, 1.0, 1, 1, 1, 1, 0.5, 0]))


def test_old_option_names_are_aliases():
    assert make_method("pod", n_s=8, n_r_ratio=0.2, n_r_min=32).options()["n_sink"] == 8
    pod = make_method("pod", n_s=8, n_r_ratio=0.2, n_r_min=32)
    assert (pod.n_sink, pod.recent, pod.recent_min) == (8, 0.2, 32)
    assert make_method("h2o", recent_ratio=0.25).recent == 0.25
    assert make_method("cam", recent_ratio=0.25).recent == 0.25
    composite = make_method("pod+kvmerger", n_s=8, recent=0.2)  # old and new names, both PoD's
    assert (composite.n_sink, composite.recent, composite.inner.n_sink, composite.inner.recent) == (8, 0.2, 4, 0.3)
    with pytest.raises(KvcliError, match="given twice"):
        make_method("pod", n_s=8, n_sink=8)
    with pytest.raises(KvcliError, match="unknown option"):
        make_method("kvmerger", n_s=8)  # n_s is PoD's old name only


def test_presets_with_old_option_names_still_load(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("method: pod+kvmerger\nbudget: 0.5\noptions: {n_s: 12, n_r_ratio: 0.2, threshold: 0.6}\n")
    s = settings.load_preset(str(path))
    assert s.options == {"pod.n_sink": 12, "pod.recent": 0.2, "kvmerger.threshold": 0.6}
    s = settings.resolve_settings(preset=str(path), options={"n_sink": 10, "kvmerger.recent": 0.2})
    m = make_method(s.method, **s.options)
    assert (m.n_sink, m.recent, m.inner.threshold, m.inner.recent) == (10, 0.2, 0.6, 0.2)


def test_builtin_presets_use_the_current_names():
    for info in settings.list_presets():
        assert info.available, info
        assert not {"n_s", "n_r_ratio", "n_r_min", "recent_ratio"} & set(info.options)
    pod = settings.load_preset("pod-compact")
    m = make_method(pod.method, **pod.options)
    assert (m.n_sink, m.recent, m.block_size) == (16, 0.125, 2) and (m.inner.n_sink, m.inner.recent) == (4, 0.3)


def test_plain_and_scoped_keys_across_methods():
    per = split_options(
        {"recent": 0.2, "threshold": 0.6, "pod.recent_min": 64, "kvmerger.heavy": 0.05},
        ["h2o", "kvmerger", "pod+kvmerger", "streaming"],
    )
    assert per["h2o"] == {"recent": 0.2}
    assert per["kvmerger"] == {"recent": 0.2, "threshold": 0.6, "heavy": 0.05}
    assert per["pod+kvmerger"] == {"recent": 0.2, "threshold": 0.6, "pod.recent_min": 64, "kvmerger.heavy": 0.05}
    assert per["streaming"] == {}
    m = make_method("pod+kvmerger", **per["pod+kvmerger"])  # plain keys: PoD's when PoD has them, else the inner's
    assert (m.recent, m.recent_min, m.inner.recent, m.inner.threshold, m.inner.heavy) == (0.2, 64, 0.3, 0.6, 0.05)
    inner = make_method("pod+kvmerger", **{"kvmerger.recent": 0.25})
    assert (inner.recent, inner.inner.recent) == (0.125, 0.25)
    with pytest.raises(KvcliError, match="none of the chosen methods"):
        split_options({"threshold": 0.6}, ["h2o", "streaming"])
    with pytest.raises(KvcliError, match="not among the chosen methods"):
        split_options({"kvmerger.threshold": 0.6}, ["h2o"])


def test_prefill_takes_a_method_object():
    lm = api.wrap_model(tiny_llama(), IdTokenizer())
    ids = torch.arange(3, 83)
    meth = make_method("streaming", n_sink=2)
    ctx = api.prefill(lm, ids, method=meth, budget="40", chunk_size=16, raw=True)
    assert ctx.engine.method is meth and ctx.report().method_options == {"n_sink": 2}
    by_name = api.prefill(
        lm, ids, method="streaming", budget="40", chunk_size=16, raw=True, method_options={"n_sink": 2}
    )
    assert ctx.report().kv_bytes == by_name.report().kv_bytes
    with pytest.raises(KvcliError, match="method_options"):
        api.prefill(lm, ids, method=meth, raw=True, method_options={"n_sink": 3})


def test_cli_refuses_bad_options_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """The model path does not exist: the option error must come first (options are checked
    when the method is made, before any model loads)."""
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.\n")
    missing = str(tmp_path / "no-model")
    cases = [
        (["ask", doc, "q", "--method", "kvmerger", "-o", "threshold=abc"], "threshold"),
        (["summarize", doc, "--method", "h2o", "-o", "recent=7"], "recent"),
        (["ask", doc, "q", "--method", "streaming", "-o", "n_sink=-5"], "n_sink"),
        (["ask", doc, "q", "--method", "snapkv", "-o", "kernel=4"], "kernel"),
        (["ask", doc, "q", "--method", "h2o", "-o", "threshold=0.5"], "threshold"),
        (["profile", "--methods", "h2o,kvmerger", "-o", "kvmerger.sigma=0", "--no-isolate"], "sigma"),
        (["eval", "--methods", "h2o", "-o", "kvmerger.threshold=0.5", "--out", tmp_path / "o"], "kvmerger"),
    ]
    for args, needle in cases:
        monkeypatch.setattr(sys, "argv", ["kvcli", *map(str, args), "--model", missing])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1, (args, err)
        assert needle in err and "no-model" not in err, (args, err)


def test_profile_estimate_takes_options(tmp_path):
    from conftest import tiny_gemma3

    path = tmp_path / "config.json"
    tiny_gemma3(layers=4, window=8).config.to_json_file(str(path))
    result = runner.invoke(
        app,
        [
            "profile",
            "--estimate",
            "--model",
            str(path),
            "--context",
            "200",
            "--json",
            "--methods",
            "h2o,kvmerger,pod+kvmerger",
            "-o",
            "recent=0.2",
            "-o",
            "kvmerger.threshold=0.6",
            "--dtype",
            "float32",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {r["method"]: r["method_options"] for r in json.loads(result.stdout)}
    assert rows["h2o"]["recent"] == 0.2 and rows["kvmerger"]["recent"] == 0.2
    assert rows["kvmerger"]["threshold"] == 0.6 and rows["pod+kvmerger"]["inner"]["threshold"] == 0.6
    assert rows["pod+kvmerger"]["recent"] == 0.2 and rows["pod+kvmerger"]["inner"]["recent"] == 0.3


def test_every_method_name_makes_a_method():
    for name in method_names():
        assert make_method(name).label == name
