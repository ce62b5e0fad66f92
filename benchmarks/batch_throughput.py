"""Corpus throughput of ``kvcli batch``: one worker, local worker processes, Ray actors.

Writes ``--docs`` documents of about ``--tokens`` tokens each (seeded prose from
``kvcli.eval.fillers``, one planted fact per document, sized with the model's tokenizer),
then runs the same ``kvcli batch`` command over them once per configuration, each in a
fresh process with a fresh results file:

* ``1 worker``: in the driver process (torch on every core);
* ``1 worker, 1 thread``: the same with ``OMP_NUM_THREADS=1`` (on a machine shared with other
  work, torch's threads spin against each other and the other processes: this is the fair
  one-process baseline there);
* ``2 workers``: ``--workers 2``, two local processes (torch threads split between them);
* ``ray 2``: ``--workers 2 --ray``, two actors on a local Ray started by the run.

Reported per configuration: wall time of the whole command (start-up and model loads
included), documents per hour on that wall time, the summary line's prefill tokens/s, the
seconds until the first document finished (start-up), and how many planted facts the
answers contain (a check that every configuration did the same work).  Ray's overhead is
its wall time over the 2-process wall time.

    python benchmarks/batch_throughput.py                              # the issue's size: 16 x 4K, SmolLM2
    python benchmarks/batch_throughput.py --docs 8 --tokens 2048       # smaller, for a shared 2-core machine
    python benchmarks/batch_throughput.py --configs 1,2                # without Ray

Writes results/batch_throughput.json and .md.  A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: key -> (label, extra flags, extra environment)
CONFIGS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "1": ("1 worker", [], {}),
    "1t": ("1 worker, 1 thread", [], {"OMP_NUM_THREADS": "1"}),
    "2": ("2 workers", ["--workers", "2"], {}),
    "ray": ("ray 2", ["--workers", "2", "--ray"], {}),
}


def make_corpus(folder: Path, docs: int, tokens: int, model: str, seed: int) -> list[tuple[str, str]]:
    """``docs`` documents of about ``tokens`` tokens; returns (name, planted value) per document."""
    from kvcli.engine.models.loading import load_tokenizer
    from kvcli.eval.fillers import filler_sentences

    tok = load_tokenizer(model, quiet=True)
    rng = random.Random(seed)
    planted = []
    for i in range(docs):
        value = str(rng.randrange(1_000_000, 9_999_999))
        fact = f"The special magic number for the harbour office is {value}."
        stream = filler_sentences("prose", random.Random(seed * 1000 + i))
        sentences: list[str] = []
        count = 0
        while count < tokens:
            s = next(stream)
            sentences.append(s)
            count += len(tok.encode(" " + s, add_special_tokens=False))
        sentences.insert(int(len(sentences) * rng.uniform(0.2, 0.8)), fact)
        name = f"report-{i:02d}.txt"
        (folder / name).write_text(" ".join(sentences) + "\n", encoding="utf-8")
        planted.append((name, value))
    return planted


def run_config(label: str, extra: list[str], env: dict, base: list[str], out: Path, timeout: float) -> dict:
    """One configuration in a fresh process; past ``timeout`` it is stopped and what it
    finished is reported (``timed_out``)."""
    cmd = [*base, "--output", str(out), "-q", *extra]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **env})
        first = None
        timed_out = False
        while proc.poll() is None:
            if first is None and out.exists() and out.read_bytes().count(b"\n") >= 1:
                first = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                # kvcli stops with whole lines (exit 130), after the model forward it is in: on a
                # loaded machine one 512-token chunk can take a minute; then it is killed.
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=180)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                timed_out = True
                break
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 and not timed_out:
        raise SystemExit(f"{label}: exit {proc.returncode}: {log.read_text().strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
    return {
        "label": label,
        "wall_seconds": wall,
        "first_document_seconds": first,
        "timed_out": timed_out,
        "rows": rows,
        "command": cmd,
        "env": env,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--configs", default="1,2,ray", help="comma-separated: 1, 1t, 2, ray")
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--scoring", default="auto", help="kvcli's --scoring (window: about 2.5x less work per document)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--out", default="results/batch_throughput")
    args = ap.parse_args()

    kvcli = [sys.executable, "-c", "from kvcli.cli.app import main; main()"]
    results = []
    with tempfile.TemporaryDirectory(prefix="kvcli-batch-bench-") as tmp:
        corpus = Path(tmp) / "docs"
        corpus.mkdir()
        planted = dict(make_corpus(corpus, args.docs, args.tokens, args.model, args.seed))
        base = [
            *kvcli,
            "batch",
            str(corpus),
            "--ask",
            "What is the special magic number for the harbour office?",
            "--model",
            args.model,
            "--method",
            args.method,
            "--budget",
            args.budget,
            "--scoring",
            args.scoring,
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        for key in args.configs.split(","):
            label, extra, env = CONFIGS[key.strip()]
            print(f"{label}: running {args.docs} documents of ~{args.tokens} tokens ...", file=sys.stderr, flush=True)
            res = run_config(label, extra, env, base, Path(tmp) / f"{key}.jsonl", args.timeout)
            rows = res.pop("rows")
            docs = [r for r in rows if r["kind"] == "document"]
            summary = ([r for r in rows if r["kind"] == "summary"] or [None])[-1]
            ok = [r for r in docs if "error" not in r]
            found = sum(planted[Path(r["path"]).name] in r["answers"][0]["answer"] for r in ok)
            tokens = sum(r["context_tokens"] for r in ok)
            res.update(
                documents=len(docs),
                failed=len(docs) - len(ok),
                context_tokens=tokens,
                documents_per_hour=3600 * len(ok) / res["wall_seconds"],
                tokens_per_second=tokens / res["wall_seconds"],
                mean_document_seconds=sum(r["seconds"] for r in ok) / max(1, len(ok)),
                facts_found=found,
                summary=summary,
            )
            results.append(res)
            save(args, results)
            print(
                f"  {res['wall_seconds']:.0f} s, {res['documents_per_hour']:.0f} documents/h, "
                f"{res['tokens_per_second']:.0f} tok/s, facts {found}/{len(ok)}",
                file=sys.stderr,
                flush=True,
            )


def save(args: argparse.Namespace, results: list[dict]) -> None:
    """Write the JSON and the Markdown table (after every configuration: a later failure keeps them)."""
    by = {r["label"]: r for r in results}
    overhead = None
    if "ray 2" in by and "2 workers" in by:
        overhead = by["ray 2"]["wall_seconds"] / by["2 workers"]["wall_seconds"] - 1
    meta = {
        "docs": args.docs,
        "tokens": args.tokens,
        "model": args.model,
        "method": args.method,
        "budget": args.budget,
        "scoring": args.scoring,
        "max_new_tokens": args.max_new_tokens,
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.platform(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "ray_overhead_vs_processes": overhead,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2), encoding="utf-8")
    head = (
        f"{args.docs} documents of ~{args.tokens} tokens, {args.model}, {args.method} @ {args.budget}, "
        f"{args.max_new_tokens} new tokens, {os.cpu_count()} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.1f}"
    )
    lines = [
        head,
        "",
        "| configuration | wall s | documents/h | tokens/s | first document s | mean s per document | facts found |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first = f"{r['first_document_seconds']:.0f}" if r["first_document_seconds"] else "-"
        lines.append(
            f"| {r['label']} | {r['wall_seconds']:.0f} | {r['documents_per_hour']:.0f} | {r['tokens_per_second']:.0f} "
            f"| {first} | {r['mean_document_seconds']:.1f} | {r['facts_found']}/{r['documents'] - r['failed']} |"
            + (" stopped at the time limit |" if r["timed_out"] else "")
        )
    if overhead is not None:
        lines += ["", f"Ray (2 actors) against 2 local processes: {100 * overhead:+.0f}% wall time."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
