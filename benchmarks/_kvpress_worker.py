"""Worker for benchmarks/peer_kvpress.py: answers tasks with kvpress (one press x budget).

Runs in the *peer* virtual environment (torch + transformers + kvpress, never kvcli), so
it imports nothing from kvcli.  One process per press x budget, so that the peak RSS it
reports (``ru_maxrss`` at the end) belongs to that run alone.

    python _kvpress_worker.py --model DIR --tasks tasks.jsonl --press snapkv --ratio 0.5 [--skip ID,...]

Input: a JSONL file of tasks, each with ``id``, ``kvp_context``, ``kvp_question`` and
``kvp_answer_prefix`` (the strings handed to kvpress's ``kv-press-text-generation``
pipeline; the driver chose them so the token ids equal kvcli's prompt).  Output, on
stdout, one JSON object per line: ``{"type": "row", ...}`` per task and a final
``{"type": "end", ...}`` with the peak RSS.  Everything else (warnings, logs) goes to stderr.

The pipeline is used as it ships; two of its methods are wrapped only to observe:
``preprocess`` (the token ids it built, to check the prompt) and ``generate_answer``
(its first call marks the end of prefill + compression, and the cache is measured there).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import resource
import sys
import time

PRESSES = ("none", "kvzip", "snapkv", "expected_attention")


def ids_digest(ids) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:16]


def make_press(name: str, ratio: float):
    import kvpress

    if name == "none":
        return None
    if name == "kvzip":
        return kvpress.KVzipPress(compression_ratio=ratio)
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    raise SystemExit(f"unknown press {name!r} (choose from {', '.join(PRESSES)})")


def cache_figures(cache, model) -> dict:
    """Physical bytes and entries of the cache right after prefill + compression, and how
    many entries are masked (KVzip in kvpress 0.5.5 masks keys instead of dropping them)."""
    kv_bytes = 0
    entries = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            kv_bytes += t.numel() * t.element_size()
        entries += layer.keys.shape[1] * layer.keys.shape[2]  # kv heads x tokens
    masked = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            masked += int(idx[0].numel())
    return {"kv_bytes": kv_bytes, "kv_entries": entries, "masked_entries": masked,
            "cache_tokens_layer0": int(cache.layers[0].keys.shape[2])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--press", required=True, choices=PRESSES)
    ap.add_argument("--ratio", type=float, default=0.0, help="kvpress compression_ratio (fraction removed)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated task ids already done")
    args = ap.parse_args()

    t_start = time.perf_counter()
    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline, patches attention)
    import torch
    import transformers
    from transformers import pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    with open(args.tasks, encoding="utf-8") as f:
        tasks = [json.loads(line) for line in f if line.strip()]
    tasks = [t for t in tasks if t["id"] not in skip]

    pipe = pipeline("kv-press-text-generation", model=args.model, device="cpu", dtype=torch.float32)
    model = pipe.model
    press = make_press(args.press, args.ratio)
    load_seconds = time.perf_counter() - t_start
    rss_loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    seen: dict = {}
    orig_pre = pipe.preprocess
    orig_gen = pipe.generate_answer
    orig_fwd = pipe._forward

    def preprocess(*a, **kw):
        out = orig_pre(*a, **kw)
        seen["context_ids"] = out["context_ids"][0].tolist()
        seen["question_ids"] = out["questions_ids"][0][0].tolist()
        return out

    def forward(*a, **kw):
        seen["t0"] = time.perf_counter()
        seen.pop("t1", None)
        return orig_fwd(*a, **kw)

    def generate_answer(question_ids, cache, context_length, max_new_tokens):
        if "t1" not in seen:
            seen["t1"] = time.perf_counter()
            seen["cache"] = cache_figures(cache, model)
            seen["context_length"] = context_length
        return orig_gen(question_ids=question_ids, cache=cache, context_length=context_length,
                        max_new_tokens=max_new_tokens)

    pipe.preprocess = preprocess
    pipe._forward = forward
    pipe.generate_answer = generate_answer

    print(json.dumps({"type": "start", "press": args.press, "ratio": args.ratio, "tasks": len(tasks),
                      "load_seconds": load_seconds, "torch": torch.__version__,
                      "transformers": transformers.__version__, "kvpress": importlib.metadata.version("kvpress"),
                      "threads": torch.get_num_threads(), "attn": model.config._attn_implementation,
                      "rss_after_load_bytes": rss_loaded_kb * 1024}), flush=True)
    for t in tasks:
        seen.clear()
        t0 = time.perf_counter()
        out = pipe(t["kvp_context"], question=t["kvp_question"], answer_prefix=t["kvp_answer_prefix"],
                   press=press, max_new_tokens=args.max_new_tokens)
        total = time.perf_counter() - t0
        prefill = seen["t1"] - seen["t0"]
        print(json.dumps({
            "type": "row", "id": t["id"], "answer": out["answer"],
            "prefill_seconds": prefill, "decode_seconds": total - prefill - (seen["t0"] - t0),
            "total_seconds": total,
            "context_tokens": len(seen["context_ids"]), "question_tokens": len(seen["question_ids"]),
            "context_digest": ids_digest(seen["context_ids"]), "question_digest": ids_digest(seen["question_ids"]),
            **seen["cache"],
        }), flush=True)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    print(json.dumps({"type": "end", "peak_rss_bytes": peak_kb * 1024, "tasks": len(tasks),
                      "seconds": time.perf_counter() - t_start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
