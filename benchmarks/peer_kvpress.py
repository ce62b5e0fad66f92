"""Peer benchmark: kvpress (NVIDIA, 0.5.5) on kvcli's synthetic needle tasks, same model, same prompt.

    python benchmarks/peer_kvpress.py                                  # full run: 2 kinds x 3 lengths x 8 samples,
                                                                       # full cache + 3 presses x 2 budgets (hours on 2 cores)
    python benchmarks/peer_kvpress.py --samples 1 --lengths 2048       # smoke run

Run it with kvcli's python.  It generates the tasks with ``kvcli.eval.tasks.generate_suite``
(niah_single depths spread evenly over the samples, as in benchmarks/eval_quality.py),
writes them to ``OUT/tasks.jsonl``, then runs ``benchmarks/_kvpress_worker.py`` with the
peer venv's python (kvpress is never a dependency of kvcli), one subprocess per
press x budget so each reports its own peak RSS.  Answers are scored with
``kvcli.eval.scoring.score``.  Writes ``OUT/rows.jsonl`` (one row per task and run),
``OUT/runs.jsonl`` (one line per worker process: peak RSS, seconds) and
``OUT/results.md`` (the tables, with the command).  Resumable: rows already in
``rows.jsonl`` for the same task text are skipped (``--fresh`` starts over).

Budgets are the fraction of the context *kept* (kvcli's convention); kvpress's
``compression_ratio`` is the fraction removed, so budget 0.5 -> 0.5 and 0.35 -> 0.65.

Prompt: kvcli (chat models) puts the document in one user message as
"{document}\\n\\n{question}" with the chat template and generation prompt, prefills
"<template prefix>{document}" and then decodes from "\\n\\n{question}<template suffix> {answer_prefix}".
kvpress's pipeline prefills "<template prefix>{context}" and then
"{question}<template suffix>{answer_prefix}", so it is given context=document,
question="\\n\\n" + question and answer_prefix=" " + answer_prefix: the same strings.  Both
token-id sequences are compared per task (kvcli's from its tokenizer, kvpress's reported
by the worker from the pipeline's own preprocess) and the report says whether they match.
Neither tool sees the question during prefill (question-agnostic compression).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_kvpress_worker.py"
PRESS_NAMES = {"none": "full cache", "kvzip": "KVzipPress", "snapkv": "SnapKVPress",
               "expected_attention": "ExpectedAttentionPress"}
_SENTINEL = "\u2063KVCLI_DOCUMENT\u2063"
DECODE_UNITS = 1500  # a 48-token answer costs about as much as prefilling this many tokens (for the ETA)


def ids_digest(ids) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:16]


def text_digest(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]


def split_chat_template(tokenizer) -> tuple[str, str]:
    """kvcli's split (kvcli/prompts.py ``chat_template``): (prefix, question_format)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_SENTINEL}\n\n{{question}}"}], tokenize=False, add_generation_prompt=True)
    prefix, suffix = rendered.split(_SENTINEL, 1)
    for module in ("kvcli.prompts", "kvcli.core.prompts"):  # where kvcli's own split lives; it must agree
        try:
            chat_template = __import__(module, fromlist=["chat_template"]).chat_template
        except ImportError:
            continue
        t = chat_template(tokenizer)
        if (t.prefix, t.question_format, t.add_bos) != (prefix, suffix, False):
            raise SystemExit(f"error: {module}.chat_template no longer splits the template as this benchmark does")
        break
    return prefix, suffix


def kvpress_split(tokenizer, context: str) -> tuple[str, str]:
    """What kvpress 0.5.5's pipeline.preprocess builds: (templated context, question suffix)."""
    separator = "#" * (len(context) + 10)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}],
                                             add_generation_prompt=True, tokenize=False)
    ctx, suffix = rendered.split(separator)
    return ctx, suffix


def build_tasks(args, tokenizer) -> list[dict]:
    from kvcli.eval.tasks import generate_suite

    samples = args.samples
    depths = tuple(round((i + 0.5) / samples, 3) for i in range(samples)) if samples > 1 else (0.5,)
    suite = generate_suite(args.tasks, args.lengths, samples, args.seed, tokenizer, depths=depths)
    prefix, qfmt = split_chat_template(tokenizer)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    prefix_ids = enc(prefix)
    counts: dict = {}
    out = []
    for task in suite:
        i = counts.get((task.kind, task.target_length), 0)
        counts[(task.kind, task.target_length)] = i + 1
        # kvcli: prefill prefix_ids + enc(document); then enc(question text); see kvcli/api.py
        ap = task.answer_prefix.strip()
        kvcli_question = qfmt.format(question=task.question.strip()) + (" " + ap if ap else "")
        kvcli_ctx_ids = prefix_ids + enc(task.context)
        kvcli_q_ids = enc(kvcli_question)
        # kvpress: context=document, question="\n\n"+question, answer_prefix=" "+answer_prefix
        kvp_q, kvp_ap = "\n\n" + task.question.strip(), (" " + ap if ap else "")
        kvp_ctx_text, kvp_suffix = kvpress_split(tokenizer, task.context)
        same_text = (kvp_ctx_text == prefix + task.context) and (kvp_q + kvp_suffix + kvp_ap == kvcli_question)
        out.append({
            "id": f"{task.kind}-{task.target_length}-{i}", "kind": task.kind, "length": task.target_length,
            "tokens": task.length, "depth": task.depth, "sample": i, "seed": task.seed,
            "question": task.question, "answers": list(task.answers), "metric": task.metric,
            "answer_prefix": task.answer_prefix, "context": task.context,
            "kvp_context": task.context, "kvp_question": kvp_q, "kvp_answer_prefix": kvp_ap,
            "prompt_text_identical": same_text,
            "kvcli_context_digest": ids_digest(kvcli_ctx_ids), "kvcli_question_digest": ids_digest(kvcli_q_ids),
            "kvcli_context_tokens": len(kvcli_ctx_ids),
            "digest": text_digest(task.context, task.question, kvp_q, kvp_ap),
            "_task": task,
        })
    return out


def fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def label_length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else ("8K" if n == 7680 else str(n))


def write_report(out: Path, rows: list[dict], runs: list[dict], config: dict) -> str:
    kinds = config["tasks"]
    lengths = config["lengths"]
    configs = [("none", "1.0")] + [(p, str(b)) for p in config["presses"] if p != "none" for b in config["budgets"]]
    by = {}
    for r in rows:
        by.setdefault((r["press"], r["budget"]), []).append(r)
    lines = [f"# kvpress {config.get('kvpress', '0.5.5')} peer benchmark: {config['model_name']}", "",
             f"Command: `{config['command']}`", "",
             (f"{config['samples']} samples per (kind, length), seed {config['seed']}, greedy, max_new_tokens "
             f"{config['max_new_tokens']}, float32, CPU ({config['threads']} threads). Budget = fraction of the "
             "context kept (kvpress compression_ratio = 1 - budget). Lengths are context tokens (7680 = \"8K\"). "
             "Score: kvcli.eval.scoring.score, in %."), ""]
    ident = [r.get("prompt_identical") for r in rows]
    lines.append(f"Prompt token ids identical to kvcli's: {sum(1 for x in ident if x)}/{len(ident)} rows.")
    lines.append("")
    head = ["press", "budget"] + [f"{k.replace('niah_', '')} {label_length(n)}" for k in kinds for n in lengths] + ["mean"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for press, budget in configs:
        rs = by.get((press, budget), [])
        if not rs:
            continue
        cells = []
        for k in kinds:
            for n in lengths:
                sc = [r["score"] for r in rs if r["kind"] == k and r["length"] == n]
                cells.append(f"{100 * sum(sc) / len(sc):.0f} ({len(sc)})" if sc else "-")
        mean = 100 * sum(r["score"] for r in rs) / len(rs)
        lines.append(f"| {PRESS_NAMES.get(press, press)} | {budget} | " + " | ".join(cells) + f" | {mean:.0f} |")
    lines += ["", ("Cells: % score (tasks). Seconds = prefill + compression (mean per task, by length); "
              "decode = mean seconds to answer (up to max_new_tokens). KV = bytes the cache physically holds "
              "after compression at the longest length; 'effective' counts masked entries as gone. Peak RSS: "
              "ru_maxrss of the worker process (model load + every task of that press x budget; the longest "
              "one-shot prefill dominates); 'after load' is the same process right after loading the model. "
              "Load avg: the machine's 1-minute load average when each answer finished (mean); timings on a "
              "shared CPU are only comparable at similar load. KVzipPress's prefill seconds include its "
              "reconstruction passes (and the tokenizer it loads on every call)."), ""]
    head = (["press", "budget"] + [f"prefill s {label_length(n)}" for n in lengths]
            + ["decode s", f"KV {label_length(max(lengths))} physical", "effective kept", "peak RSS", "RSS after load",
               "load avg"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for press, budget in configs:
        rs = by.get((press, budget), [])
        if not rs:
            continue
        cells = []
        for n in lengths:
            s = [r["prefill_seconds"] for r in rs if r["length"] == n]
            cells.append(f"{sum(s) / len(s):.1f}" if s else "-")
        dec = sum(r["decode_seconds"] for r in rs) / len(rs)
        longest = [r for r in rs if r["length"] == max(lengths)]
        kv = sum(r["kv_bytes"] for r in longest) / len(longest) if longest else None
        eff = (sum((r["kv_entries"] - r["masked_entries"]) / r["kv_entries"] for r in longest) / len(longest)
               if longest else None)
        rr = [x for x in runs if x.get("press") == press and x.get("budget") == budget and "peak_rss_bytes" in x]
        peak = max((x["peak_rss_bytes"] for x in rr), default=None)
        loaded = max((x.get("rss_after_load_bytes", 0) for x in rr), default=None)
        split = f" ({len(rr)} processes)" if len(rr) > 1 else ""
        lines.append(f"| {PRESS_NAMES.get(press, press)} | {budget} | " + " | ".join(cells)
                     + f" | {dec:.1f} | {fmt_bytes(kv)} | {'-' if eff is None else f'{100 * eff:.0f}%'}"
                     + f" | {fmt_bytes(peak)}{split} | {fmt_bytes(loaded)}"
                     + f" | {sum(r.get('loadavg', 0) for r in rs) / len(rs):.1f} |")
    lines.append("")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/scratch/smollm2", help="saved HF model directory (transformers >= 5.4)")
    ap.add_argument("--peer-python", default="/work/peer-venv/bin/python", help="python of the venv with kvpress")
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--lengths", default="2048,4096,7680")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presses", default="none,kvzip,snapkv,expected_attention",
                    help="comma-separated: none (full cache), kvzip, snapkv, expected_attention")
    ap.add_argument("--budgets", default="0.5,0.35", help="fractions of the context kept")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "peer_kvpress"))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already written")
    args = ap.parse_args(argv)
    args.tasks = [k.strip() for k in args.tasks.split(",") if k.strip()]
    args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    for p in presses:
        if p not in PRESS_NAMES:
            print(f"error: unknown press {p!r} (choose from {', '.join(PRESS_NAMES)})", file=sys.stderr)
            return 2
    if not all(0 < b < 1 for b in budgets):
        print("error: budgets must be fractions in (0, 1)", file=sys.stderr)
        return 2
    if not Path(args.peer_python).exists():
        print(f"error: peer python {args.peer_python} not found; create it with: python -m venv /work/peer-venv && "
              "/work/peer-venv/bin/pip install torch==2.13.0 kvpress==0.5.5", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/peer_kvpress.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from transformers import AutoTokenizer

    from kvcli.eval.scoring import score

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    tasks = build_tasks(args, tokenizer)
    print(f"generated {len(tasks)} tasks in {time.perf_counter() - t0:.0f} s; prompt text identical to kvcli's: "
          f"{sum(t['prompt_text_identical'] for t in tasks)}/{len(tasks)}", file=sys.stderr, flush=True)
    with open(out / "tasks.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: v for k, v in t.items() if k != "_task"}) + "\n" for t in tasks)
    by_id = {t["id"]: t for t in tasks}

    rows_path, runs_path = out / "rows.jsonl", out / "runs.jsonl"
    if args.fresh:
        for p in (rows_path, runs_path):
            p.unlink(missing_ok=True)
    old = [json.loads(l) for l in rows_path.open(encoding="utf-8")] if rows_path.exists() else []
    done = {(r["press"], r["budget"], r["id"]) for r in old
            if r["id"] in by_id and r.get("digest") == by_id[r["id"]]["digest"]
            and r.get("max_new_tokens") == args.max_new_tokens}

    runs = [("none", 1.0)] + [(p, b) for p in presses if p != "none" for b in budgets]
    if "none" not in presses:
        runs = runs[1:]
    order = sorted(tasks, key=lambda t: (t["length"], t["kind"], t["sample"]))
    todo = {(p, b): [t for t in order if (p, str(b), t["id"]) not in done] for p, b in runs}
    units = lambda p, t: t["tokens"] * (3 if p == "kvzip" else 1) + DECODE_UNITS
    total_units = sum(units(p, t) for (p, b), ts in todo.items() for t in ts)
    n_total = sum(len(ts) for ts in todo.values())
    print(f"{n_total} answers to compute ({len(done)} already done) in {sum(1 for ts in todo.values() if ts)} "
          f"worker runs", file=sys.stderr, flush=True)

    subset = out / "worker_tasks.jsonl"
    done_units, n_done, start = 0.0, 0, time.perf_counter()
    versions: dict = {}
    for (press, budget), ts in todo.items():
        if not ts:
            continue
        with open(subset, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({k: t[k] for k in ("id", "kvp_context", "kvp_question", "kvp_answer_prefix")}) + "\n" for t in ts)
        ratio = 0.0 if press == "none" else round(1.0 - budget, 6)
        cmd = [args.peer_python, str(WORKER), "--model", args.model, "--tasks", str(subset), "--press", press,
               "--ratio", str(ratio), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
        bud = str(budget)
        print(f"== {PRESS_NAMES[press]} budget {bud} (compression_ratio {ratio}): {len(ts)} tasks", file=sys.stderr,
              flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        run_info: dict = {"press": press, "budget": bud, "ratio": ratio, "tasks": len(ts), "started": time.time()}
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg["type"] == "start":
                run_info.update({k: msg[k] for k in ("load_seconds", "torch", "transformers", "threads", "attn",
                                                     "rss_after_load_bytes")})
                versions = {k: msg[k] for k in ("torch", "transformers", "kvpress")}
            elif msg["type"] == "row":
                t = by_id[msg["id"]]
                sc = score(t["_task"], msg["answer"])
                row = {k: t[k] for k in ("id", "kind", "length", "tokens", "depth", "sample", "seed", "answers",
                                         "metric", "digest")}
                row.update(press=press, budget=bud, compression_ratio=ratio, score=sc, answer=msg["answer"],
                           max_new_tokens=args.max_new_tokens, loadavg=os.getloadavg()[0],
                           prompt_identical=(msg["context_digest"] == t["kvcli_context_digest"]
                                             and msg["question_digest"] == t["kvcli_question_digest"]),
                           **{k: msg[k] for k in ("prefill_seconds", "decode_seconds", "context_tokens",
                                                  "question_tokens", "kv_bytes", "kv_entries", "masked_entries",
                                                  "cache_tokens_layer0")})
                with rows_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                n_done += 1
                done_units += units(press, t)
                el = time.perf_counter() - start
                eta = el / done_units * (total_units - done_units)
                print(f"[{n_done}/{n_total}] {el / 60:.1f} min, eta {eta / 60:.0f} min  {press}@{bud} {t['id']} "
                      f"score {sc:.0f} prefill {msg['prefill_seconds']:.1f}s  answer: {msg['answer'].strip()[:70]!r}"
                      + ("" if row["prompt_identical"] else "  [PROMPT IDS DIFFER]"), file=sys.stderr, flush=True)
            elif msg["type"] == "end":
                run_info.update(peak_rss_bytes=msg["peak_rss_bytes"], seconds=msg["seconds"])
        rc = proc.wait()
        run_info["returncode"] = rc
        with runs_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(run_info) + "\n")
        if rc != 0:
            print(f"error: the kvpress worker failed ({PRESS_NAMES[press]} budget {bud}, exit {rc}); rows so far are "
                  f"kept in {rows_path}; rerun to resume", file=sys.stderr)
            return 1
        print(f"   peak RSS {fmt_bytes(run_info.get('peak_rss_bytes'))}, {run_info.get('seconds', 0) / 60:.1f} min",
              file=sys.stderr, flush=True)
    subset.unlink(missing_ok=True)

    wanted = {(p, str(b)) for p, b in runs}
    rows = [json.loads(l) for l in rows_path.open(encoding="utf-8")] if rows_path.exists() else []
    rows = [r for r in rows if r["id"] in by_id and r["digest"] == by_id[r["id"]]["digest"]
            and (r["press"], r["budget"]) in wanted and r.get("max_new_tokens") == args.max_new_tokens]
    all_runs = [json.loads(l) for l in runs_path.open(encoding="utf-8")] if runs_path.exists() else []
    config = {"command": command.strip(), "model_name": Path(args.model).name, "tasks": args.tasks,
              "lengths": args.lengths, "samples": args.samples, "seed": args.seed, "presses": presses,
              "budgets": budgets, "max_new_tokens": args.max_new_tokens, "threads": args.threads, **versions}
    print(write_report(out, rows, all_runs, config))
    print(f"wrote {out / 'results.md'}, {rows_path}, {runs_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
