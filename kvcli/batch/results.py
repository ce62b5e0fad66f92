"""The results file: one JSON object per line, written by one writer, never half a line.

Each line is written with a single ``os.write`` of the whole line, then flushed to disk
(``os.fsync``), so a run killed at any moment (Ctrl-C, ``kill -9``, a power cut) leaves
whole lines plus, at worst, one cut-off last line; opening the file again for a rerun
reads the whole lines and truncates a cut-off tail (only the bytes after the last newline
go).  An exclusive lock (``flock``) keeps a second run off the same file.  Without a file
the lines go to stdout (nothing to resume from).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import IO, Self

from ..core.errors import KvcliError
from ..core.fileio import new_file_mode

#: How every line starts (``json.dumps`` of a dict whose first key is ``kind``): only a
#: cut-off tail that starts so is ours to remove.
LINE_START = b'{"kind": "'


def read_results(path: str | os.PathLike) -> tuple[list[dict], int]:
    """``(the whole lines as objects, the byte length they span)``; a last line without its
    newline (a cut-off write of ours) is not counted.  A whole line that is not a JSON object means
    the file is not a batch's results: an error, so nothing is appended to someone else's file."""
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not data[end:].startswith(LINE_START[: len(data) - end]):
        raise KvcliError(f"{path}: its last line is not one kvcli writes; is this a kvcli batch results file?")
    rows = []
    for no, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            raise KvcliError(f"{path}: line {no} is not a JSON object; is this a kvcli batch results file?")
        if "kind" not in row:
            raise KvcliError(f'{path}: line {no} has no "kind"; is this a kvcli batch results file?')
        rows.append(row)
    return rows, end


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


class ResultsWriter:
    """``with ResultsWriter(path) as out: out.write(obj)``; ``out.previous``: the lines a
    previous run left (read before anything is appended)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.previous: list[dict] = []
        self.cut_bytes = 0  # a cut-off last line removed on opening
        self._fd: int | None = None
        self._stream: IO[str] | None = None

    def __enter__(self) -> Self:
        if self.path is None:
            self._stream = sys.stdout
            return self
        name = str(self.path)
        mode = new_file_mode(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, mode)
        except OSError as exc:
            raise KvcliError(f"cannot write {name}: {exc.strerror or type(exc).__name__}", option="output") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KvcliError(f"{name} is in use by another kvcli batch run", option="output") from None
            if not os.path.isfile(self.path):
                raise KvcliError(f"cannot write {name}: not a regular file", option="output")
            self.previous, end = read_results(self.path)
            size = os.fstat(fd).st_size
            if size > end:  # a line cut off by a kill: drop just that tail
                os.ftruncate(fd, end)
                os.fsync(fd)
                self.cut_bytes = size - end
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def write(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        if self._fd is None:
            assert self._stream is not None
            self._stream.write(line)
            self._stream.flush()
            return
        data = line.encode("utf-8")
        written = 0
        while written < len(data):  # one write for a regular file; the loop covers the rare short write
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
