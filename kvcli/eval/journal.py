"""``kvcli eval``'s journal: the rows of every finished prefill, kept on disk as the run goes.

An evaluation on a CPU runs for hours, and its results used to reach the disk only at the
end.  The journal (``journal.jsonl`` in ``--out``, a ``core.jsonlines`` file: whole lines
only, one writer) gets one line per prefill as soon as its questions are answered::

    {"kind": "prefill", "key": "...", "label": "snapkv/recon@0.5", "rows": [...]}

with ``"options": {...}`` after the label when the method ran with ``-o`` options (the rows
do not carry them, and one ``--out`` may hold runs of one method with different options).

A run looks up each of its prefills there first and takes the rows of one with the same
key instead of running it again, so a run that was cut off resumes where it stopped, and a
later run with other methods in the same ``--out`` reuses the full cache's rows.

The key hashes everything the rows depend on: the model (its fingerprint, dtype, device,
chat template), the code that ran it (a hash of kvcli's own source files, so any change to
kvcli runs everything again, and the torch and transformers versions), the context and each
question with its references and answer budget, the method, its options, budget, scoring,
chunk size, attention backend and ``--truncate``; for PoD, also the calibration profiles and
adapters in kvcli's cache, which it picks up by itself.  Timings in reused rows
(``prefill_seconds``) are those of the run that measured them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ..core.fileio import cache_dir
from ..core.jsonlines import LinesWriter
from .rows import EvalRow

if TYPE_CHECKING:
    from ..api import LoadedModel

NAME = "journal.jsonl"
WHAT = "kvcli eval journal"
_ROW_FIELDS = {f.name for f in fields(EvalRow)}


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.cache
def code_identity() -> dict[str, str]:
    """kvcli's source (every ``.py`` file under the package, by path and content) and the
    versions of the libraries that compute the numbers."""
    import torch
    import transformers

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"kvcli": digest.hexdigest(), "torch": torch.__version__, "transformers": transformers.__version__}


def model_identity(lm: LoadedModel) -> dict[str, Any]:
    """The model as far as its answers go: weights, configuration and vocabulary
    (``fingerprint``), dtype, device, prompt style and chat template."""
    from ..engine.models.fingerprint import fingerprint

    template = getattr(lm.tokenizer, "chat_template", None)
    return {
        **fingerprint(lm.model, lm.tokenizer),
        "dtype": str(lm.dtype),
        "device": lm.device.type,
        "is_base": lm.is_base,
        "template": _digest(template) if template else None,
    }


def cache_files_identity(method: str) -> str | None:
    """For a method that reads files of kvcli's cache by itself (PoD: calibration profiles and
    adapters), the names, sizes and times of those files; None for the others."""
    if not method.startswith("pod"):
        return None
    entries = []
    for sub in ("calibration", "adapters"):
        folder = cache_dir() / sub
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                st = p.stat()
                entries.append((sub, p.name, st.st_size, st.st_mtime_ns))
    return _digest(entries)


def prefill_key(base: dict[str, Any], context: str, questions: Sequence[dict[str, Any]], run: dict[str, Any]) -> str:
    """The key of one prefill: ``base`` (model, code, settings common to the run), the context,
    the questions answered from it (question, references, answer budget) and the run (method,
    options, budget, scoring)."""
    data = {
        "base": base,
        "context": hashlib.sha256(context.encode("utf-8")).hexdigest(),
        "questions": list(questions),
        "run": run,
    }
    return _digest(data)[:32]


def row_from_dict(data: dict) -> EvalRow | None:
    """An ``EvalRow`` from a journal line's row; None when it is not one (another version's)."""
    if not isinstance(data, dict) or not _ROW_FIELDS.issuperset(data) or "score" not in data:
        return None
    try:
        return EvalRow(**data)
    except TypeError:
        return None


class Journal:
    """``with Journal(out_dir) as journal``: ``journal.get(key)`` the rows a previous run kept
    for that prefill (None if none, or with ``reuse=False``), ``journal.add(key, label, rows)``
    writes a finished prefill's rows at once."""

    def __init__(self, out_dir: str | os.PathLike, reuse: bool = True) -> None:
        self.path = Path(out_dir) / NAME
        self.reuse = reuse
        self._writer = LinesWriter(self.path, what=WHAT, user="another kvcli eval run")
        self._done: dict[str, list[EvalRow]] = {}
        self.cut_bytes = 0

    def __enter__(self) -> Self:
        self._writer.__enter__()
        self.cut_bytes = self._writer.cut_bytes
        if self.reuse:
            for line in self._writer.previous:
                if line.get("kind") != "prefill" or not isinstance(line.get("rows"), list):
                    continue
                rows = [row_from_dict(r) for r in line["rows"]]
                if rows and all(r is not None for r in rows):
                    self._done[str(line.get("key"))] = [r for r in rows if r is not None]
        return self

    def __exit__(self, *exc: object) -> None:
        self._writer.__exit__(*exc)

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> list[EvalRow] | None:
        return self._done.get(key)

    def add(self, key: str, label: str, rows: Sequence[EvalRow], options: dict[str, Any] | None = None) -> None:
        line: dict[str, Any] = {"kind": "prefill", "key": key, "label": label}
        if options:
            line["options"] = dict(options)
        line["rows"] = [r.as_dict() for r in rows]
        self._writer.write(line)
        self._done[key] = list(rows)
