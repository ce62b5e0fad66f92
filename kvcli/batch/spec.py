"""What a batch does to every document, and the key that says a document was done that way.

Nothing here imports torch: the command line builds and checks a ``BatchSpec`` (and reads
the ``--questions`` file, parses ``--kv-memory``) before any model library loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import KvcliError
from ..core.fileio import read_text_file


@dataclass(frozen=True)
class BatchSpec:
    """Everything a worker needs besides the document (picklable: it travels to worker
    processes and Ray actors).  ``budget`` is a budget as ``parse_budget`` reads it
    (allocation included); ``questions`` empty means summarize."""

    model: str
    method: str
    budget: str
    options: dict = field(default_factory=dict)
    scoring: str = "auto"
    chunk_size: int = 512
    questions: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    truncate: bool = False
    kv_memory: int | None = None  # bytes the compressed cache must fit; the budget is chosen per document
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"

    @property
    def summarize(self) -> bool:
        return not self.questions

    def key_fields(self) -> dict:
        """What decides a document's result: a rerun with the same values skips it.  Device,
        attention backend and the number of workers are left out (the same answers)."""
        data = asdict(self)
        for name in ("device", "attn"):
            data.pop(name)
        data["model"] = model_identity(self.model)
        data["questions"] = list(self.questions)
        return data

    def key(self) -> str:
        """A short hash of ``key_fields`` (with the document's sha256 it names a result)."""
        text = json.dumps(self.key_fields(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_identity(model: str) -> str:
    """A model directory by its absolute path (the same model from any working directory);
    a name (``embedded``, a hub id) as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


# ---- --questions -----------------------------------------------------------------------------------
def load_questions_file(path: str | os.PathLike) -> list[str]:
    """The questions of a JSONL file: one per line, a JSON object with a non-empty
    ``"question"`` (other keys, such as an expected answer, are ignored) or a JSON string;
    blank lines are skipped.  Errors name the file and the line."""
    name = Path(path).name
    out: list[str] = []
    for no, line in enumerate(read_text_file(path, "questions file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KvcliError(f"questions file {name} line {no}: invalid JSON ({exc.msg})") from None
        question = obj.get("question") if isinstance(obj, dict) else obj
        if not isinstance(question, str) or not question.strip():
            raise KvcliError(
                f'questions file {name} line {no}: expected {{"question": "..."}} with a non-empty question'
            )
        out.append(question.strip())
    if not out:
        raise KvcliError(f"questions file {name}: no questions in it")
    return out


# ---- --kv-memory ------------------------------------------------------------------------------------
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, flag: str = "--kv-memory") -> int:
    """``200MB``, ``1.5GB``, ``512MiB``, ``300000`` (bytes) as a number of bytes (MB = 10^6,
    MiB = 2^20)."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise KvcliError(f"{flag} {text!r} is invalid: give a size such as 200MB, 1.5GB or 512MiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise KvcliError(f"{flag} {text!r} is invalid: it must be more than 0 bytes")
    return value


def size_text(n: int) -> str:
    """``200 MB`` / ``1.5 GB`` / ``812 kB``: a byte count as people write it (decimal units)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"
