"""``kvcli adapt``: parse, call ``kvcli.adapt.train``, render.  docs/pod_adapt.md has the why."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from ..core import defaults
from ..core.errors import KvcliError
from . import checks
from .common import load_model
from .options import ChunkOpt, DeviceOpt, DtypeOpt, ModelOpt, QuietOpt, err, progress


def parse_blocks(value: str | None) -> list[list[int]] | None:
    """``--blocks``: ``0-3,4-7,8`` (runs of layers) or a YAML list of lists (``[[0, 1], [2, 3]]``)."""
    if value is None or value.strip() in ("", "auto"):
        return None
    text = value.strip()
    bad = KvcliError(
        f"invalid --blocks {value!r}: give runs of layers like 0-3,4-7 or a list of lists like [[0, 1], [2, 3]]"
    )
    if text.startswith("["):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            raise bad from None
        ok = isinstance(data, list) and bool(data)
        ok = ok and all(isinstance(b, list) and b and all(type(i) is int and i >= 0 for i in b) for b in data)
        if not ok:
            raise bad
        return [list(b) for b in data]
    out: list[list[int]] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise bad
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise bad
        out.append(list(range(a, b + 1)))
    return out


def _render(result: Any, model: str) -> None:
    out = Console(highlight=False)
    curve = result.curve
    table = Table(title=f"PoD adapter: {model}", title_justify="left", caption_justify="left")
    table.add_column("step", justify="right")
    for name in ("attn", "kl"):
        if curve and name in curve[0]:
            table.add_column(f"{name} loss", justify="right")
    table.add_column("seconds", justify="right")
    every = max(1, len(curve) // 12)
    for i, rec in enumerate(curve):
        if i % every and i != len(curve) - 1:
            continue
        cells = [str(rec["step"])] + [f"{rec[n]:.4f}" for n in ("attn", "kl") if n in rec]
        table.add_row(*cells, f"{rec.get('seconds', 0):.1f}")
    out.print(table)
    if result.evaluations:
        ev = Table(
            title="held-out text (tokens after the first chunk)",
            title_justify="left",
            caption="KL: mean KL(full cache || pod) of next-token distributions, nats",
            caption_justify="left",
        )
        for col in ("step", "tokens", "ppl full", "ppl pod", "ppl pod+adapter", "KL pod", "KL pod+adapter"):
            ev.add_column(col, justify="right")
        for e in result.evaluations:
            ev.add_row(
                str(e.step),
                str(e.tokens),
                f"{e.ppl_full:.3f}",
                f"{e.ppl_pod:.3f}",
                f"{e.ppl_adapted:.3f}",
                f"{e.kl_pod:.4f}",
                f"{e.kl_adapted:.4f}",
            )
        out.print(ev)
    resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
    out.print(
        f"blocks: {json.dumps(result.blocks)} ({result.blocks_source}); {result.trainable:,} trainable parameters"
    )
    out.print(
        f"wrote {result.path} ({result.steps} steps{resumed}, {result.seconds:.0f} s); --method pod uses it "
        "automatically for this model and grouping (--no-adapter to compare)",
        soft_wrap=True,
    )


def adapt(
    model: ModelOpt = defaults.MODEL,
    steps: Annotated[int, typer.Option("--steps", help="Training steps in all (a resumed run continues to N).")] = 60,
    blocks: Annotated[
        str | None,
        typer.Option(
            "--blocks",
            help="PoD blocks: runs like 0-3,4-7 or [[0, 1], [2, 3]] (default: the calibration profile, else "
            "--block-size).",
        ),
    ] = None,
    block_size: Annotated[
        int | None, typer.Option("--block-size", help="Consecutive layers per block (instead of --blocks).")
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Training context in tokens.")] = 2048,
    chunk_size: ChunkOpt = None,
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank of the q/k deltas.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 2e-3,
    loss: Annotated[
        str,
        typer.Option(
            "--loss",
            help="attn: each member's attention output vs the full cache's, layer-local (cheap); kl: next-token KL "
            "through the network; kl+attn: both.",
        ),
    ] = "attn",
    inner: Annotated[int, typer.Option("--inner", help="attn loss: updates per teacher forward.")] = 3,
    positions: Annotated[int, typer.Option("--positions", help="Positions per sample the loss reads.")] = 256,
    held_out: Annotated[
        int, typer.Option("--held-out", help="Held-out samples for perplexity before and after (0: none).")
    ] = 2,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training samples.")] = 0,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore a checkpoint of this run and start from step 0.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a PoD adapter: LoRA on member layers' q/k so they read the anchor's distant keys well.

    Self-distillation on installed documentation and generated filler: the model with PoD
    attention learns to match itself with the full cache. Checkpoints every --save-every
    steps; a rerun with the same settings resumes."""
    from ..adapt.train import AdaptSettings

    checks.run_options(device, dtype, "auto")
    pod: dict[str, Any] = {}
    parsed = parse_blocks(blocks)
    if parsed is not None and block_size is not None:
        raise KvcliError("give --blocks or --block-size, not both")
    if parsed is not None:
        pod["blocks"] = parsed
    if block_size is not None:
        if block_size < 1:
            raise KvcliError(f"invalid --block-size {block_size}: it must be at least 1")
    settings = AdaptSettings(
        steps=steps,
        tokens=tokens,
        chunk_size=defaults.CHUNK_SIZE if chunk_size is None else chunk_size,
        rank=rank,
        lr=lr,
        loss=loss,
        inner=inner,
        positions=positions,
        held_out=held_out,
        save_every=save_every,
        seed=seed,
        pod_options=pod,
    )
    flags = {"steps": "--steps", "tokens": "--tokens", "chunk_size": "--chunk-size", "rank": "--rank", "lr": "--lr"}
    flags |= {"loss": "--loss", "inner": "--inner", "positions": "--positions", "held_out": "--held-out"}
    flags |= {"save_every": "--save-every", "seed": "--seed"}

    def flagged(exc: KvcliError) -> KvcliError:
        """The library names its parameters; the command line names its flags."""
        text = str(exc)
        for name, flag in flags.items():
            if exc.option == name and text.startswith(name):
                text = flag + text[len(name) :]
        return KvcliError(text)

    try:
        settings.check()
    except KvcliError as exc:
        raise flagged(exc) from None

    from ..adapt.train import Trainer

    lm = load_model(model, device, dtype, quiet or as_json)
    if block_size is not None:  # explicit blocks: a calibration profile must not win over the size given
        from ..cache import KVCache

        growing = KVCache(lm.model.config).growing_indices
        settings.pod_options["blocks"] = [growing[i : i + block_size] for i in range(0, len(growing), block_size)]
    try:
        trainer = Trainer(lm, settings)
    except KvcliError as exc:
        raise flagged(exc) from None
    bar = progress(not (quiet or as_json), unit="steps", eta=True)
    if bar is None:
        result = trainer.run(restart=restart)
    else:
        with bar:
            task = bar.add_task("adapt", total=settings.steps, info="")

            def on_stage(text: str) -> None:
                bar.update(task, info=text)

            def on_step(done: int, total: int, rec: dict) -> None:
                info = "  ".join(f"{k} {rec[k]:.4f}" for k in ("attn", "kl") if k in rec)
                bar.update(task, completed=done, total=total, info=info)

            result = trainer.run(restart=restart, on_step=on_step, on_stage=on_stage)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        _render(result, lm.name)
    if result.resumed_from and not (quiet or as_json):
        err.print(f"(resumed from the checkpoint at step {result.resumed_from})", highlight=False)
