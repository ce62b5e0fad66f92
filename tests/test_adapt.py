"""PoD adaptation (``kvcli adapt``): the differentiable PoD attention is the engine's PoD,
zero-initialised LoRA is training-free PoD, training lowers the KL to the full cache, the
adapter file round-trips and is applied by ``--method pod`` only where it fits, a stopped
run resumes, and bad flags are one-line errors."""

import copy

import pytest
import torch

from kvcli import api
from kvcli.adapt.lora import Lora
from kvcli.adapt.text import Corpus, training_sample
from kvcli.adapt.train import AdaptSettings, Trainer, forward, kl_div
from kvcli.attention.pod_train import TrainAttention
from kvcli.core.errors import KvcliError
from kvcli.engine.models.adapter import adapter_path, load_adapter, model_digest
from kvcli.methods.pod import PoD

from conftest import IdTokenizer, sharpen, tiny_gemma3, tiny_llama
from test_cli import run_cli

SMALL = dict(n_sink=4, recent_min=8, recent=0.05)
CHUNK = 16

MODELS = {
    "llama-gqa": (lambda: tiny_llama(num_kv_heads=2, layers=4), [[0, 1], [2, 3]]),
    "gemma3": (lambda: tiny_gemma3(layers=6), [[1, 3], [5]]),  # growing layers 1, 3, 5
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Adapters and checkpoints go to a fresh kvcli cache; no calibration profile applies."""
    monkeypatch.setenv("KVCLI_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models():
    return {name: sharpen(make()) for name, (make, _) in MODELS.items()}


def wrap(model):
    return api.wrap_model(copy.deepcopy(model), IdTokenizer())


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(seed))


def train_state(blocks, total: int, pod: bool = True) -> TrainAttention:
    plan = PoD(**SMALL).training_plan(total, CHUNK)
    return TrainAttention(anchor_of={m: b[0] for b in blocks for m in b[1:]}, n_sink=4, chunks=plan, pod=pod)


def engine_logits(lm, ids, method: str, options: dict | None = None) -> torch.Tensor:
    opts = {**SMALL, **(options or {})} if method == "pod" else None
    ctx = api.prefill(lm, ids, method=method, chunk_size=CHUNK, raw=True, method_options=opts)
    return ctx.engine.context_logits()


@pytest.mark.parametrize("shape", MODELS)
@pytest.mark.parametrize("total", [33, 150, 200])
def test_differentiable_pod_equals_the_engines_pod(models, shape, total):
    """Last logits of a whole-sequence training forward equal a chunked ``pod`` prefill of
    the same tokens (beyond the proximal window, where PoD differs from the full cache)."""
    lm = wrap(models[shape])
    blocks = MODELS[shape][1]
    ids = ids_of(total)
    with torch.no_grad():
        student = forward(lm.model, ids.view(1, -1), train_state(blocks, total))[-1]
        teacher = forward(lm.model, ids.view(1, -1), train_state(blocks, total, pod=False))[-1]
    pod = engine_logits(lm, ids, "pod", {"blocks": blocks})
    full = engine_logits(lm, ids, "full")
    assert torch.allclose(student, pod, atol=1e-4), (student - pod).abs().max()
    assert torch.allclose(teacher, full, atol=1e-4), (teacher - full).abs().max()
    if total > 100:  # the comparison means something only where PoD and full differ
        assert (pod - full).abs().max() > 1e-2


def test_member_query_subset_equals_the_full_computation(models):
    """A layer-local loss computes only some query rows: those rows are the same."""
    lm = wrap(models["llama-gqa"])
    ids = ids_of(200).view(1, -1)
    every = train_state([[0, 1], [2, 3]], 200)
    rows = torch.tensor([20, 70, 150, 199])
    attn = lm.model.model.layers[1].self_attn
    captured = {}
    hook = attn.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        forward(lm.model, ids, every)
    hook.remove()
    some = train_state([[0, 1], [2, 3]], 200)
    some.stash, some.queries = every.stash, rows
    with torch.no_grad():
        full_out = attn(
            hidden_states=captured["hidden_states"],
            position_embeddings=captured["position_embeddings"],
            attention_mask=None,
            kvcli_train=every,
        )[0]
        part_out = attn(
            hidden_states=captured["hidden_states"],
            position_embeddings=captured["position_embeddings"],
            attention_mask=None,
            kvcli_train=some,
        )[0]
    assert torch.allclose(full_out[:, rows], part_out[:, rows], atol=1e-5)


def test_zero_initialised_lora_is_training_free_pod(models):
    lm = wrap(models["llama-gqa"])
    ids = ids_of(200).view(1, -1)
    with torch.no_grad():
        before = forward(lm.model, ids, train_state([[0, 1], [2, 3]], 200))
        lora = Lora(lm.model, [1, 3], rank=4, scale=1.0)
        assert all(m.lora_a.abs().sum() > 0 for m in lora.modules.values())  # A random, B zero
        after = forward(lm.model, ids, train_state([[0, 1], [2, 3]], 200))
    lora.remove()
    assert torch.equal(before, after)


def corpus(seed: int = 1) -> Corpus:
    g = torch.Generator().manual_seed(seed)
    return Corpus(
        train=torch.randint(3, 128, (4000,), generator=g).tolist(),
        held=torch.randint(3, 128, (600,), generator=g).tolist(),
        filler=torch.randint(3, 128, (2000,), generator=g).tolist(),
        packages=["a"],
        held_packages=["b"],
    )


def settings(**kw) -> AdaptSettings:
    base = dict(
        steps=4,
        tokens=96,
        chunk_size=CHUNK,
        rank=4,
        lr=2e-2,
        loss="kl",
        held_out=0,
        save_every=2,
        copies=2,
        span=6,
        positions=48,
        pod_options={**SMALL, "blocks": [[0, 1], [2, 3]]},
    )
    return AdaptSettings(**{**base, **kw})


def sample_kl(trainer: Trainer, step: int) -> float:
    ids = trainer.sample(step)
    keep = torch.arange(trainer.start, ids.shape[1])
    with torch.no_grad():
        with trainer.lora.disabled():
            full = forward(trainer.model, ids, trainer.state(pod=False), keep)
        pod = forward(trainer.model, ids, trainer.state(pod=True), keep)
    return float(kl_div(full, pod))


@pytest.mark.parametrize("loss", ["kl", "attn"])
def test_a_few_steps_lower_the_kl_to_the_full_cache(models, loss):
    lm = wrap(models["llama-gqa"])
    s = settings(loss=loss, steps=1, tokens=96)
    trainer = Trainer(lm, s, corpus())
    trainer.sample = lambda step: Trainer.sample(trainer, 0)  # one sample, seen again and again
    before = sample_kl(trainer, 0)
    for step in range(8):
        trainer.train_step(step)
    after = sample_kl(trainer, 0)
    trainer.lora.remove()
    assert before > 1e-4
    assert after < 0.8 * before, (before, after)


def test_adapter_round_trip_and_the_engine_applies_it(models):
    """The written adapter holds the trained deltas; ``pod`` applies it automatically (its
    logits are the trained student's), ``adapter=none`` is training-free PoD."""
    lm = wrap(models["llama-gqa"])
    trainer = Trainer(lm, settings(steps=3), corpus())
    result = trainer.run()
    assert result.path == adapter_path(model_digest(lm.model), [[0, 1], [2, 3]]) and result.path.is_file()
    adapter = load_adapter(result.path)
    assert adapter.header["steps"] == 3 and len(adapter.header["curve"]) == 3
    for key, (a, b) in trainer.lora.deltas().items():
        assert torch.equal(adapter.deltas[key][0], a) and torch.equal(adapter.deltas[key][1], b)
    assert any(b.abs().sum() > 0 for _, b in adapter.deltas.values())

    ids = ids_of(200, seed=3)
    lora = Lora(lm.model, [1, 3], rank=4, scale=1.0)
    lora.load(adapter.deltas)
    with torch.no_grad():
        student = forward(lm.model, ids.view(1, -1), train_state([[0, 1], [2, 3]], 200))[-1]
        with lora.disabled():
            free = forward(lm.model, ids.view(1, -1), train_state([[0, 1], [2, 3]], 200))[-1]
    lora.remove()
    ctx = api.prefill(
        lm, ids, method="pod", chunk_size=CHUNK, raw=True, method_options={**SMALL, "blocks": [[0, 1], [2, 3]]}
    )
    assert ctx.report().adapter == str(result.path)
    assert ctx.report().method_options["adapter"] == str(result.path)
    assert torch.allclose(ctx.engine.context_logits(), student, atol=1e-4)
    plain = api.prefill(
        lm,
        ids,
        method="pod",
        chunk_size=CHUNK,
        raw=True,
        method_options={**SMALL, "blocks": [[0, 1], [2, 3]], "adapter": "none"},
    )
    assert plain.report().adapter == "none"
    assert torch.allclose(plain.engine.context_logits(), free, atol=1e-4)
    assert (student - free).abs().max() > 1e-4  # the adapter changed something
    # the model's own weights are untouched after the adapted runs: full is still full
    with torch.no_grad():
        teacher = forward(lm.model, ids.view(1, -1), train_state([[0, 1], [2, 3]], 200, pod=False))[-1]
    assert torch.allclose(engine_logits(lm, ids, "full"), teacher, atol=1e-4)


def test_an_adapter_for_another_grouping_or_model_is_not_used(models):
    lm = wrap(models["llama-gqa"])
    path = Trainer(lm, settings(steps=1), corpus()).run().path
    ids = ids_of(150)
    other_blocks = {**SMALL, "blocks": [[0, 1, 2, 3]]}
    ctx = api.prefill(lm, ids, method="pod", chunk_size=CHUNK, raw=True, method_options=other_blocks)
    assert ctx.report().adapter == "none"
    with pytest.raises(KvcliError, match="trained for the blocks"):
        api.prefill(
            lm, ids, method="pod", chunk_size=CHUNK, raw=True, method_options={**other_blocks, "adapter": str(path)}
        )
    other_model = wrap(sharpen(tiny_llama(num_kv_heads=2, layers=4, seed=5)))
    same_blocks = {**SMALL, "blocks": [[0, 1], [2, 3]]}
    ctx = api.prefill(other_model, ids, method="pod", chunk_size=CHUNK, raw=True, method_options=same_blocks)
    assert ctx.report().adapter == "none"
    with pytest.raises(KvcliError, match="another model"):
        api.prefill(
            other_model,
            ids,
            method="pod",
            chunk_size=CHUNK,
            raw=True,
            method_options={**same_blocks, "adapter": str(path)},
        )
    with pytest.raises(KvcliError, match="no such file"):
        api.prefill(
            lm,
            ids,
            method="pod",
            chunk_size=CHUNK,
            raw=True,
            method_options={**same_blocks, "adapter": str(path) + ".missing"},
        )


def test_resume_continues_the_step_count_and_the_same_run(models):
    data = corpus()
    stopped = Trainer(wrap(models["llama-gqa"]), settings(steps=2, save_every=1), data)
    stopped.run()
    resumed = Trainer(wrap(models["llama-gqa"]), settings(steps=4, save_every=1), data)
    result = resumed.run()
    assert result.resumed_from == 2 and result.steps == 4 and [r["step"] for r in result.curve] == [1, 2, 3, 4]
    resumed_deltas = load_adapter(result.path).deltas
    whole = Trainer(wrap(models["llama-gqa"]), settings(steps=4, save_every=1), data).run(restart=True)
    assert whole.resumed_from == 0
    for key, (a, b) in load_adapter(whole.path).deltas.items():
        assert torch.allclose(resumed_deltas[key][0], a, atol=1e-6)
        assert torch.allclose(resumed_deltas[key][1], b, atol=1e-6)
    assert [r["kl"] for r in whole.curve] == pytest.approx([r["kl"] for r in result.curve], rel=1e-4)


def test_other_settings_do_not_resume_a_checkpoint(models):
    data = corpus()
    Trainer(wrap(models["llama-gqa"]), settings(steps=2), data).run()
    result = Trainer(wrap(models["llama-gqa"]), settings(steps=2, lr=1e-3), data).run()
    assert result.resumed_from == 0


def test_training_samples_repeat_distant_spans_and_are_deterministic():
    data = corpus()
    a = training_sample(data, 7, 96, 0, distant_end=40, copies=2, span=6, filler_share=0.0)
    assert a == training_sample(data, 7, 96, 0, distant_end=40, copies=2, span=6, filler_share=0.0)
    assert a != training_sample(data, 8, 96, 0, distant_end=40, copies=2, span=6, filler_share=0.0)
    tail = a[72:]
    assert any(a[i : i + 6] == tail[j : j + 6] for i in range(34) for j in range(len(tail) - 5))


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"rank": 0},
        {"loss": "mse"},
        {"tokens": 16},  # not beyond the first chunk
        {"lr": 2.0},
    ],
)
def test_invalid_settings_are_one_line_errors(bad):
    with pytest.raises(KvcliError):
        settings(**bad).check()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps"),
        (["--blocks", "3-1"], "--blocks"),
        (["--blocks", "a,b"], "--blocks"),
        (["--blocks", "[[0, 1], 'x']"], "--blocks"),
        (["--loss", "mse"], "--loss"),
        (["--blocks", "0-1", "--block-size", "2"], "not both"),
    ],
)
def test_adapt_cli_rejects_bad_flags_before_loading(capfd, monkeypatch, args, message):
    result = run_cli(["adapt", *args], capfd, monkeypatch)
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.err


def test_adapt_cli_rejects_blocks_that_do_not_fit_the_model(tmp_path, capfd, monkeypatch):
    from conftest import save_word_llama

    model = save_word_llama(tmp_path / "m", layers=4)
    args = ["adapt", "--model", str(model), "--tokens", "256", "--chunk-size", "64", "-q"]
    result = run_cli([*args, "--blocks", "0-1,1-3"], capfd, monkeypatch)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1 and "partition" in result.err
    result = run_cli(["adapt", "--model", str(model), "--tokens", "1024", "-q"], capfd, monkeypatch)
    assert result.code == 2
    assert len(result.err.strip().splitlines()) == 1 and "--tokens 1024: the model handles 512" in result.err
