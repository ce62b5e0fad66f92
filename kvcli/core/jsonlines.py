"""An append-only JSON-lines file with one writer: never half a line, resumable after a kill.

Each line is one JSON object whose first key is ``kind``, written with a single ``os.write``
of the whole line, then flushed to disk (``os.fsync``), so a run killed at any moment
(Ctrl-C, ``kill -9``, a power cut) leaves whole lines plus, at worst, one cut-off last
line; opening the file again reads the whole lines and truncates a cut-off tail (only the
bytes after the last newline go, and only when they start as kvcli's lines do).  An
exclusive lock (``flock``) keeps a second writer off the same file.  Without a path the
lines go to stdout (nothing to resume from).  ``kvcli batch`` keeps its results so,
``kvcli eval`` its journal.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import IO, Self

from .errors import KvcliError
from .fileio import new_file_mode

#: How every line starts (``json.dumps`` of a dict whose first key is ``kind``): only a
#: cut-off tail that starts so is ours to remove.
LINE_START = b'{"kind": "'


def read_lines(path: str | os.PathLike, what: str = "kvcli JSON-lines file") -> tuple[list[dict], int]:
    """``(the whole lines as objects, the byte length they span)``; a last line without its
    newline (a cut-off write of ours) is not counted.  A whole line that is not a JSON object
    with a ``kind`` means the file is not ours: an error naming ``what`` it should have been,
    so nothing is appended to someone else's file."""
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not data[end:].startswith(LINE_START[: len(data) - end]):
        raise KvcliError(f"{path}: its last line is not one kvcli writes; is this a {what}?")
    rows = []
    for no, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            raise KvcliError(f"{path}: line {no} is not a JSON object; is this a {what}?")
        if "kind" not in row:
            raise KvcliError(f'{path}: line {no} has no "kind"; is this a {what}?')
        rows.append(row)
    return rows, end


class LinesWriter:
    """``with LinesWriter(path) as out: out.write(obj)``; ``out.previous``: the lines a
    previous run left (read before anything is appended); ``out.cut_bytes``: the size of a
    cut-off last line removed on opening.  ``what`` names the file in errors (``a kvcli batch
    results file``), ``user`` the other process that holds it (``another kvcli batch run``)."""

    def __init__(
        self, path: str | os.PathLike | None, what: str = "kvcli JSON-lines file", user: str = "another kvcli run"
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.what = what
        self.user = user
        self.previous: list[dict] = []
        self.cut_bytes = 0
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
                raise KvcliError(f"{name} is in use by {self.user}", option="output") from None
            if not os.path.isfile(self.path):
                raise KvcliError(f"cannot write {name}: not a regular file", option="output")
            self.previous, end = read_lines(self.path, self.what)
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
