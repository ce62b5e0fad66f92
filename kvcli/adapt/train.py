"""Self-distillation of a model to PoD: the loop behind ``kvcli adapt``.

Student: the model with PoD attention (``attention.pod_train``: members read the anchor's
keys of distant positions, chunk by chunk exactly as a ``pod`` prefill does) and LoRA on
the members' q/k projections; teacher: the same model, LoRA off, full attention.  Losses:

* ``attn`` (default, cheap enough for a CPU): layer-local.  One teacher forward records
  each member layer's input and attention output; the student recomputes that layer's
  attention alone, with PoD and its LoRA, and the loss is the squared error to the
  teacher's output over the positions where PoD differs (after the first chunk), relative
  to the output's mean square, averaged over members.  No backward through the network.
* ``kl``: KL(teacher || student) of next-token distributions at ``positions`` sampled
  positions after the first chunk, backpropagated through the whole network.
* ``kl+attn``: their sum.

Checkpoints (LoRA, optimizer state, the curve) are written atomically every
``save_every`` steps beside the adapter; a run with the same settings resumes from one
(the step count continues, the samples are those a run without a stop would have seen).
Held-out perplexity and KL to the full cache (full, training-free pod, adapted pod) are
measured before the first step and after the last.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.pod_train import TrainAttention
from ..cache import KVCache
from ..core import defaults
from ..core.errors import KvcliError
from ..core.fileio import atomic_write_bytes
from ..engine.models import LoadedModel
from ..engine.models.adapter import adapter_path, members_of, model_digest, save_adapter
from ..methods.pod import PoD
from .lora import Lora
from .text import Corpus, build_corpus, held_out_samples, training_sample

LOSSES = ("attn", "kl", "kl+attn")


@dataclass
class AdaptSettings:
    steps: int = 60
    tokens: int = 2048  # training context
    chunk_size: int = defaults.CHUNK_SIZE  # the prefill chunk PoD is trained for
    rank: int = 8
    scale: float = 1.0  # LoRA's alpha / rank
    lr: float = 2e-3
    loss: str = "attn"
    inner: int = 3  # optimizer steps per teacher forward (attn loss: the recorded inputs are reused)
    positions: int = 256  # positions per sample the loss reads (KL: logits; attn: query rows)
    copies: int = 8  # copy spans per training sample
    span: int = 24  # tokens per copy span
    filler_share: float = 0.3  # samples of generated filler instead of documentation
    seed: int = 0
    save_every: int = 5
    held_out: int = 2  # held-out samples for perplexity (0: none)
    pod_options: dict = field(default_factory=dict)  # n_sink, recent, recent_min, block_size, blocks, profile

    def check(self) -> None:
        def bad(name: str, want: str, value: Any) -> KvcliError:
            return KvcliError(f"{name} {value!r} is invalid: {want}", option=name)

        for name in ("steps", "tokens", "chunk_size", "rank", "inner", "positions", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "it must be a positive integer", value)
        for name in ("copies", "span", "held_out", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(name, "it must be an integer >= 0", value)
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise bad("lr", "it must be a number in (0, 1)", self.lr)
        if not (isinstance(self.scale, int | float) and 0 < self.scale <= 64):
            raise bad("scale", "it must be a number in (0, 64]", self.scale)
        if not 0 <= self.filler_share <= 1:
            raise bad("filler_share", "it must be in [0, 1]", self.filler_share)
        if self.loss not in LOSSES:
            raise bad("loss", f"choose from {', '.join(LOSSES)}", self.loss)
        if self.tokens <= self.chunk_size:
            raise KvcliError(
                f"tokens {self.tokens}: must exceed chunk_size {self.chunk_size} (PoD shares keys from the second "
                "chunk on)",
                option="tokens",
            )
        pod = self.method()
        if pod.inner is not None:
            raise KvcliError("adapt trains plain pod", option="method")

    def method(self) -> PoD:
        return PoD(**{k: v for k, v in self.pod_options.items() if k != "adapter"})

    def identity(self) -> dict:
        """What a checkpoint must share with this run to be resumed by it."""
        out = asdict(self)
        for k in ("steps", "save_every", "held_out"):
            out.pop(k)
        return out


@dataclass
class Evaluation:
    """Held-out figures at one step: perplexity of the tokens after the first chunk, and
    the mean KL(full || pod) of their next-token distributions."""

    step: int
    tokens: int
    ppl_full: float
    ppl_pod: float
    ppl_adapted: float
    kl_pod: float
    kl_adapted: float


@dataclass
class AdaptResult:
    path: Path
    checkpoint: Path
    blocks: list[list[int]]
    blocks_source: str
    steps: int
    resumed_from: int
    curve: list[dict]
    evaluations: list[Evaluation]
    seconds: float
    trainable: int
    packages: list[str]
    held_packages: list[str]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["path"], out["checkpoint"] = str(self.path), str(self.checkpoint)
        return out


# ---- forwards ------------------------------------------------------------------------------------
def forward(model: Any, ids: torch.Tensor, state: TrainAttention, keep: torch.Tensor | int = 0) -> torch.Tensor:
    """Logits ``[T', V]`` at positions ``keep`` (a 1-D tensor; 0: every position)."""
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep, kvcli_train=state)
    return out.logits[0]


class Recorder:
    """Each member's attention input (hidden states, position embeddings) and output in a
    teacher forward (hooks on the ``self_attn`` modules)."""

    def __init__(self, model: Any, members: list[int]) -> None:
        self.inputs: dict[int, tuple[torch.Tensor, Any]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.modules: dict[int, Any] = {}
        self.handles = []
        for name, module in model.named_modules():
            idx = getattr(module, "layer_idx", None)
            if name.endswith("self_attn") and idx in members:
                self.modules[idx] = module
                self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(self._post, with_kwargs=True))
        if sorted(self.modules) != sorted(members):
            raise KvcliError("adapt: cannot find the member layers' attention modules in this model", option="model")

    def _pre(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.inputs[module.layer_idx] = (hidden.detach(), kwargs.get("position_embeddings"))

    def _post(self, module, args, kwargs, out):
        self.outputs[module.layer_idx] = (out[0] if isinstance(out, tuple) else out).detach()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def local_loss(rec: Recorder, state: TrainAttention, rows: torch.Tensor) -> torch.Tensor:
    """Mean over members of ``|pod_out - full_out|^2 / mean(full_out^2)`` at positions ``rows``
    (only those query rows are computed: ``state.queries``)."""
    total = torch.zeros(())
    state.queries = rows
    for idx, module in rec.modules.items():
        hidden, pe = rec.inputs[idx]
        out = module(hidden_states=hidden, position_embeddings=pe, attention_mask=None, kvcli_train=state)
        out = out[0] if isinstance(out, tuple) else out
        target = rec.outputs[idx][:, rows].float()
        err = (out[:, rows].float() - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
        total = total + err
    return total / max(1, len(rec.modules))


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


# ---- the run ---------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, lm: LoadedModel, settings: AdaptSettings, corpus: Corpus | None = None) -> None:
        settings.check()
        if lm.max_positions and settings.tokens > lm.max_positions:
            raise KvcliError(
                f"tokens {settings.tokens}: the model handles {lm.max_positions} positions", option="tokens"
            )
        self.lm, self.s = lm, settings
        self.model = lm.model
        self.device = lm.device
        self.pod = settings.method()
        cache = KVCache(self.model.config)
        self.blocks = self.pod.choose_blocks(cache.growing_indices, cache.config_ref)
        self.members = members_of(self.blocks)
        if not self.members:
            raise KvcliError(
                f"adapt: the blocks {self.blocks} have no member layers (every block is a single layer)",
                option="blocks",
            )
        self.anchor_of = {m: b[0] for b in self.blocks for m in b[1:]}
        self.chunks = self.pod.training_plan(settings.tokens, settings.chunk_size)
        self.start = self.chunks[1][0]  # where PoD starts to differ from the full cache
        self.digest = model_digest(self.model)
        self.path = adapter_path(self.digest, self.blocks)
        self.checkpoint = self.path.with_suffix(".ckpt")
        self.corpus = corpus if corpus is not None else build_corpus(lm.tokenizer, settings.tokens)
        self.distant_end = max(self.chunks[-1][2], self.start // 2)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.lora = Lora(self.model, self.members, settings.rank, settings.scale, settings.seed)
        self.optimizer = torch.optim.Adam(self.lora.parameters(), lr=settings.lr)
        self.curve: list[dict] = []
        self.evaluations: list[Evaluation] = []
        self.step = 0
        self.resumed_from = 0

    def state(self, pod: bool) -> TrainAttention:
        return TrainAttention(anchor_of=self.anchor_of, n_sink=self.pod.n_sink, chunks=self.chunks, pod=pod)

    def sample(self, step: int) -> torch.Tensor:
        s = self.s
        ids = training_sample(self.corpus, step, s.tokens, s.seed, self.distant_end, s.copies, s.span, s.filler_share)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    # ---- one step ----
    def train_step(self, step: int) -> dict:
        s = self.s
        ids = self.sample(step)
        t0 = time.perf_counter()
        rng = random.Random(f"{s.seed}:positions:{step}")
        keep = sorted(rng.sample(range(self.start, s.tokens), min(s.positions, s.tokens - self.start)))
        keep_t = torch.tensor(keep, device=self.device)
        use_attn, use_kl = "attn" in s.loss, "kl" in s.loss
        teacher = self.state(pod=False)
        rec = Recorder(self.model, self.members) if use_attn else None
        try:
            with torch.no_grad(), self.lora.disabled():
                t_logits = forward(self.model, ids, teacher, keep_t if use_kl else torch.tensor([s.tokens - 1]))
        finally:
            if rec is not None:
                rec.remove()
        record: dict = {"step": step + 1}
        rounds = s.inner if use_attn and not use_kl else 1
        for r in range(rounds):
            self.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            if use_attn:
                assert rec is not None
                student = self.state(pod=True)
                student.stash = {k: v.detach() for k, v in teacher.stash.items()}
                attn = local_loss(rec, student, keep_t)
                loss = loss + attn
                if r == 0:  # the loss on this (new) sample before any update on it
                    record["attn"] = float(attn.detach())
            if use_kl:
                kl = kl_div(t_logits, forward(self.model, ids, self.state(pod=True), keep_t))
                loss = loss + kl
                if r == 0:
                    record["kl"] = float(kl.detach())
            loss.backward()
            self.optimizer.step()
        record["loss"] = sum(record.get(k, 0.0) for k in ("attn", "kl"))
        record["seconds"] = round(time.perf_counter() - t0, 2)
        return record

    # ---- held-out ----
    @torch.no_grad()
    def evaluate(self, step: int) -> Evaluation | None:
        samples = held_out_samples(self.corpus, self.s.held_out, self.s.tokens)
        if not samples:
            return None
        keep = torch.arange(self.start, self.s.tokens - 1, device=self.device)
        nll = {"full": 0.0, "pod": 0.0, "adapted": 0.0}
        kl = {"pod": 0.0, "adapted": 0.0}
        n = 0
        for ids_list in samples:
            ids = torch.tensor([ids_list], dtype=torch.long, device=self.device)
            target = ids[0, self.start + 1 :]
            with self.lora.disabled():
                full = forward(self.model, ids, self.state(pod=False), keep)
                pod = forward(self.model, ids, self.state(pod=True), keep)
            adapted = forward(self.model, ids, self.state(pod=True), keep)
            for name, logits in (("full", full), ("pod", pod), ("adapted", adapted)):
                nll[name] += float(F.cross_entropy(logits.float(), target, reduction="sum"))
            kl["pod"] += float(kl_div(full, pod)) * len(target)
            kl["adapted"] += float(kl_div(full, adapted)) * len(target)
            n += len(target)
            del full, pod, adapted
        return Evaluation(
            step=step,
            tokens=n,
            ppl_full=math.exp(nll["full"] / n),
            ppl_pod=math.exp(nll["pod"] / n),
            ppl_adapted=math.exp(nll["adapted"] / n),
            kl_pod=kl["pod"] / n,
            kl_adapted=kl["adapted"] / n,
        )

    # ---- checkpoints ----
    def meta(self) -> dict:
        return {
            "digest": self.digest,
            "blocks": self.blocks,
            "settings": self.s.identity(),
            "step": self.step,
            "curve": self.curve,
            "evaluations": [asdict(e) for e in self.evaluations],
        }

    def save_checkpoint(self) -> None:
        state = {
            "meta": json.dumps(self.meta()),
            "lora": {
                f"{k[0]}.{k[1]}.{part}": t
                for k, (a, b) in self.lora.deltas().items()
                for part, t in (("a", a), ("b", b))
            },
            "optimizer": self.optimizer.state_dict(),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.checkpoint, buf.getvalue(), replace=True)

    def try_resume(self) -> str | None:
        """Continue from the checkpoint when it was written for this very run; returns why not."""
        if not self.checkpoint.is_file():
            return "no checkpoint"
        try:
            state = torch.load(io.BytesIO(self.checkpoint.read_bytes()), weights_only=True)
            meta = json.loads(state["meta"])
        except Exception as exc:  # a foreign or broken file: start afresh
            return f"checkpoint unreadable ({type(exc).__name__})"
        if meta.get("digest") != self.digest or meta.get("blocks") != self.blocks:
            return "checkpoint is for another model or grouping"
        if meta.get("settings") != json.loads(json.dumps(self.s.identity())):
            return "checkpoint was trained with other settings"
        deltas = {}
        for key in self.lora.modules:
            deltas[key] = (state["lora"][f"{key[0]}.{key[1]}.a"], state["lora"][f"{key[0]}.{key[1]}.b"])
        self.lora.load(deltas)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = self.resumed_from = int(meta["step"])
        self.curve = list(meta["curve"])
        self.evaluations = [Evaluation(**e) for e in meta["evaluations"]]
        return None

    def header(self) -> dict:
        return {
            "model": {"digest": self.digest, "name": self.lm.name, "ref": self.lm.ref or self.lm.name},
            "blocks": self.blocks,
            "rank": self.s.rank,
            "scale": self.s.scale,
            "pod": {"n_sink": self.pod.n_sink, "recent": self.pod.recent, "recent_min": self.pod.recent_min},
            "train": self.s.identity(),
            "steps": self.step,
            "curve": self.curve,
            "evaluations": [asdict(e) for e in self.evaluations],
            "text": {"packages": self.corpus.packages, "held_out_packages": self.corpus.held_packages},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def run(
        self,
        restart: bool = False,
        on_step: Callable[[int, int, dict], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
    ) -> AdaptResult:
        t0 = time.perf_counter()
        if not restart:
            self.try_resume()
        try:
            if not self.evaluations and self.s.held_out:
                if on_stage is not None:
                    on_stage("held-out evaluation (before)")
                ev = self.evaluate(0)
                if ev is not None:
                    self.evaluations.append(ev)
            if on_step is not None:
                on_step(self.step, self.s.steps, self.curve[-1] if self.curve else {})
            while self.step < self.s.steps:
                record = self.train_step(self.step)
                self.step += 1
                self.curve.append(record)
                if self.step % self.s.save_every == 0 or self.step == self.s.steps:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self.step, self.s.steps, record)
            if self.s.held_out and (not self.evaluations or self.evaluations[-1].step != self.step):
                if on_stage is not None:
                    on_stage("held-out evaluation (after)")
                ev = self.evaluate(self.step)
                if ev is not None:
                    self.evaluations.append(ev)
                self.save_checkpoint()
            save_adapter(self.path, self.header(), self.lora.deltas())
        finally:
            self.lora.remove()
        return AdaptResult(
            path=self.path,
            checkpoint=self.checkpoint,
            blocks=self.blocks,
            blocks_source=self.pod.blocks_source,
            steps=self.step,
            resumed_from=self.resumed_from,
            curve=self.curve,
            evaluations=self.evaluations,
            seconds=round(time.perf_counter() - t0, 1),
            trainable=sum(p.numel() for p in self.lora.parameters()),
            packages=self.corpus.packages,
            held_packages=self.corpus.held_packages,
        )


def adapt(
    lm: LoadedModel,
    settings: AdaptSettings,
    restart: bool = False,
    on_step: Callable[[int, int, dict], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> AdaptResult:
    """Train (or continue training) the PoD adapter of ``lm`` and write it to kvcli's cache."""
    return Trainer(lm, settings).run(restart=restart, on_step=on_step, on_stage=on_stage)
