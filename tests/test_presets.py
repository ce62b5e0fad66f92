"""Budget presets: built-ins load, flags override them, bad files fail in one line naming file and key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvcli.api import settings as presets
from kvcli.cli.app import app
from kvcli.core.defaults import ALLOCATION
from kvcli.core.errors import KvcliError
from kvcli.methods import REGISTRY, method_names

runner = CliRunner()


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_presets_load_or_name_their_missing_method():
    table = presets.builtin_presets()
    assert {"lossless", "streaming"} <= set(table)
    import yaml

    for name, path in table.items():
        data = yaml.safe_load(path.read_text())
        if data.get("method", "full") in method_names():
            s = presets.load_preset(name)
            assert s.method == data.get("method", "full")
            b = presets.parse_budget(data.get("budget", 1.0))
            assert (s.budget.ratio, s.budget.tokens) == (b.ratio, b.tokens)
            assert s.description
        else:  # a preset whose method is not written yet
            with pytest.raises(KvcliError, match="'method'"):
                presets.load_preset(name)
    assert presets.load_preset("lossless").method == "full"
    s = presets.load_preset("streaming")
    assert (s.method, str(s.budget)) == ("streaming", "0.5:uniform")  # streaming ranks nothing


def test_explicit_flags_override_a_preset(tmp_path):
    s = presets.resolve_settings(preset="streaming", budget="0.25", chunk_size=64)
    assert (s.method, str(s.budget), s.chunk_size) == ("streaming", "0.25:uniform", 64)
    path = write(
        tmp_path, "description: mine\nmethod: kvmerger\nbudget: 0.4\nchunk_size: 128\noptions: {threshold: 0.8}\n"
    )
    s = presets.resolve_settings(preset=str(path))
    assert (s.method, str(s.budget), s.chunk_size, s.options) == (
        "kvmerger",
        "0.4:heads",  # the default allocation, "auto", is kvmerger's own
        128,
        {"threshold": 0.8},
    )
    s = presets.resolve_settings(preset=str(path), options={"threshold": 0.9}, budget="300")
    assert ALLOCATION == "auto" and s.options == {"threshold": 0.9}
    assert s.budget == presets.parse_budget("300:heads")  # the default allocation survives, as kvmerger runs it
    s = presets.resolve_settings(preset=str(path), method="h2o")
    assert s.method == "h2o" and s.options == {}  # the preset's options belong to its own method
    # so does the allocation "auto" chose for it: the new method gets its own
    assert str(presets.resolve_settings(preset="streaming", method="snapkv").budget) == "0.5:relative"
    assert str(presets.resolve_settings(preset="compact", method="snapkv", budget="0.4").budget) == "0.4:relative"
    assert str(presets.resolve_settings(preset="compact", method="h2o").budget) == "0.35:heads"
    # the README's way to run KVMerger at a preset's budget: its own options and allocation
    s = presets.resolve_settings(preset="balanced", method="kvmerger")
    assert (s.method, str(s.budget), s.options) == ("kvmerger", "0.5:heads", {})
    # an allocation the preset names stays whatever the method
    named = write(tmp_path, "method: kvmerger\nbudget: 0.4\nallocation: uniform\n", "named.yaml")
    assert str(presets.resolve_settings(preset=str(named), method="snapkv").budget) == "0.4:uniform"


@pytest.mark.parametrize(
    "text,key",
    [
        ("method: [full\nbudget: 0.5\n", "invalid YAML"),
        ("- a\n- b\n", "mapping"),
        ("method: full\nbudgett: 0.5\n", "'budgett'"),
        ("method: full\nbudget: 1.5\n", "'budget'"),
        ("method: full\nbudget: 0\n", "'budget'"),
        ("method: full\nbudget: -0.2\n", "'budget'"),
        ("method: nosuch\nbudget: 0.5\n", "'method'"),
        ("method: streaming\noptions: {foo: 1}\n", "'options'"),
        ("method: kvmerger\noptions: {threshold: 2}\n", "'options'"),
        ("method: h2o\noptions: [1, 2]\n", "'options'"),
        ("method: full\nchunk_size: 0\n", "'chunk_size'"),
    ],
)
def test_bad_preset_is_one_line_naming_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(KvcliError) as info:
        presets.load_preset(str(path))
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert key in msg


def test_unknown_preset_name_lists_the_builtins():
    with pytest.raises(KvcliError, match="lossless"):
        presets.load_preset("no-such-preset")


def test_presets_command_lists_name_method_budget_description():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert lines["lossless"].split()[1:3] == ["full", "1"]
    assert lines["streaming"].split()[1:3] == ["streaming", "0.5:uniform"]
    assert "StreamingLLM" in lines["streaming"]
    col = result.stdout.splitlines()[0].index("description")  # one column, however long a budget's text
    assert all(line[col - 2 : col] == "  " and line[col] != " " for line in lines.values()), result.stdout
    rows = json.loads(runner.invoke(app, ["presets", "--json"]).stdout)
    assert {r["name"] for r in rows} == set(presets.builtin_presets())


def test_presets_command_shows_unavailable_presets_instead_of_crashing(tmp_path, monkeypatch):
    real = presets.builtin_presets()
    future = write(tmp_path, "description: needs a method not written yet\nmethod: warp\nbudget: 0.3\n", "future.yaml")
    broken = write(tmp_path, "method: [full\n", "broken.yaml")
    monkeypatch.setattr(presets, "builtin_presets", lambda: {**real, "future": future, "broken": broken})
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "warp" in lines["future"] and "0.3" in lines["future"] and "unavailable" in lines["future"]
    assert "unavailable" in lines["broken"] and "invalid YAML" in lines["broken"]
    assert "unavailable" not in lines["lossless"]
    assert "warp" not in REGISTRY


def test_cli_reports_a_bad_preset_in_one_line(tmp_path):
    path = write(tmp_path, "method: full\nbudget: 2.5\n")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kvcli"), "profile", "--preset", str(path), "--estimate"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "'budget'" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
