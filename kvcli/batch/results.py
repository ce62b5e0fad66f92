"""The results file of ``kvcli batch``: one JSON object per line (``core.jsonlines``: one
writer, never half a line, a cut-off tail dropped on reopening), and what a rerun reads
back from it.
"""

from __future__ import annotations

import os

from ..core.jsonlines import LinesWriter, read_lines

WHAT = "kvcli batch results file"


def read_results(path: str | os.PathLike) -> tuple[list[dict], int]:
    """``(the whole lines as objects, the byte length they span)`` (see ``core.jsonlines.read_lines``)."""
    return read_lines(path, WHAT)


def done_keys(rows: list[dict], contexts: bool = False) -> set[tuple[str, str]]:
    """``(sha256, settings key)`` of every document that succeeded (failed ones run again);
    with ``contexts``, only those whose saved context (``--save-contexts``) is still there."""
    return {
        (str(r.get("sha256")), str(r.get("settings")))
        for r in rows
        if r.get("kind") == "document"
        and "error" not in r
        and r.get("sha256")
        and (not contexts or os.path.isfile(str(r.get("context_file") or "")))
    }


class ResultsWriter(LinesWriter):
    """``with ResultsWriter(path) as out: out.write(obj)``; ``out.previous``: the lines a
    previous run left (read before anything is appended)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        super().__init__(path, what=WHAT, user="another kvcli batch run")
