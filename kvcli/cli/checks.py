"""The command line's own checks, run before any model library is imported (no torch here).

The library checks everything again where it uses it; these exist so that a typo is one
line within a fraction of a second instead of after torch and transformers have loaded.
The choice tables mirror the library's (``tests/test_cli_hostile.py`` checks they agree).
"""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import KvcliError

DEVICES = ("auto", "cpu", "cuda")  # kvcli.engine.models.resolve_device
DTYPES = ("auto", "float32", "bfloat16", "float16")  # kvcli.engine.models.resolve_dtype
BACKENDS = ("auto", "sdpa", "flash", "triton")  # kvcli.attention.backends.BACKENDS

#: Smallest prefill chunk the command line accepts.  Each chunk is one model forward plus a
#: compression step (and the scored methods' statistics pass), so tiny chunks multiply the
#: fixed cost per chunk: a 16-token chunk is already ~30x the forwards of the default 512.
#: The library (and the tests) may use any positive size.
MIN_CHUNK_SIZE = 16


def choice(flag: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise KvcliError(f"{flag} {value!r} is invalid: use {', '.join(choices)}")
    return str(value)


def chunk_size(flag: str, value: Any) -> int:
    """A prefill chunk size as the command line allows it (``MIN_CHUNK_SIZE`` or more)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvcliError(f"{flag} {value!r} is invalid: give a whole number of tokens (default 512)")
    if value < MIN_CHUNK_SIZE:
        raise KvcliError(
            f"{flag} {value} is too small: each chunk is a model forward plus a compression step, so tiny "
            f"chunks take far longer; use {MIN_CHUNK_SIZE} or more (default 512)"
        )
    return value


def generation(max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """``--max-new-tokens`` (1 or more: 0 would answer nothing), ``--temperature``, ``--top-p``."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise KvcliError(
            f"--max-new-tokens {max_new_tokens} is invalid: it must be 1 or more (the most tokens of each answer)"
        )
    if not (math.isfinite(temperature) and temperature >= 0):
        raise KvcliError(f"--temperature {temperature} is invalid: it must be 0 (greedy) or more")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise KvcliError(f"--top-p {top_p} is invalid: it must be in (0, 1]")


def run_options(device: str, dtype: str, attn: str) -> None:
    choice("--device", device, DEVICES)
    choice("--dtype", dtype, DTYPES)
    choice("--attn", attn, BACKENDS)
