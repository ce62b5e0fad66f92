"""What is in kvcli's cache directory, and removing it (``kvcli cache``).

kvcli writes three folders there: ``models/`` (converted embedded models, the list of local
models used, conversion locks and work folders), ``calibration/`` (PoD grouping profiles
from ``kvcli calibrate``) and ``downloads/`` (wheels placed by hand for offline use).
Anything else found there is listed as not kvcli's and left alone.  Symlinks are never
followed: a link is listed and removed as a link, never its target.  A model that another
kvcli is converting right now (its lock is held) and live conversion folders are skipped.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from ...core.fileio import cache_dir
from .fetch import WORK_PREFIX, is_complete, work_owner_alive
from .registry import EMBEDDED, KNOWN_FILE

KVCLI_FOLDERS = ("models", "calibration", "downloads")


@dataclass
class CacheEntry:
    path: str
    kind: str  # model | partial model | conversion | stale conversion | known models | calibration | download | other
    size_bytes: int
    note: str = ""
    removable: bool = True  # False: not kvcli's, or in use

    def as_dict(self) -> dict:
        return asdict(self)


def tree_bytes(path: Path, follow_files: bool = False) -> int:
    """Bytes under ``path``; symlinked folders are never entered, and a symlinked file counts
    as itself unless ``follow_files`` (a hub snapshot's files link to their blobs)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    stack = [path]
    while stack:
        folder = stack.pop()
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for p in entries:
            try:
                if p.is_dir() and not p.is_symlink():
                    stack.append(p)
                else:
                    total += p.stat().st_size if follow_files and p.is_file() else p.lstat().st_size
            except OSError:
                continue
    return total


def _lock_for(model_dir: Path) -> Path:
    return model_dir.parent / f".{model_dir.name}.lock"


def _model_entry(p: Path) -> CacheEntry:
    names = {e.dirname: e.name for e in EMBEDDED}
    size = tree_bytes(p)
    if p.is_symlink():
        return CacheEntry(str(p), "other", size, "symlink (not followed)")
    if p.name.startswith(WORK_PREFIX):
        if work_owner_alive(p):
            return CacheEntry(str(p), "conversion", size, "a conversion is running", removable=False)
        return CacheEntry(str(p), "stale conversion", size, "left by a killed conversion")
    if p.name == KNOWN_FILE:
        return CacheEntry(str(p), "known models", size, "local models used (kvcli models)")
    if p.name.endswith(".lock") or (p.name.startswith(f".{KNOWN_FILE}.") and p.is_file()):
        return CacheEntry(str(p), "lock", size, removable=False)
    if p.is_dir():
        label = names.get(p.name, p.name)
        if is_complete(p):
            return CacheEntry(str(p), "model", size, label)
        return CacheEntry(str(p), "partial model", size, f"{label}: incomplete (replaced on next use)")
    return CacheEntry(str(p), "other", size)


def list_cache(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache directory kvcli knows about, and the others (not removable)."""
    root = root or cache_dir()
    if not root.is_dir():
        return []
    out: list[CacheEntry] = []
    for top in sorted(root.iterdir()):
        if top.name not in KVCLI_FOLDERS or top.is_symlink() or not top.is_dir():
            out.append(CacheEntry(str(top), "other", tree_bytes(top), "not kvcli's: left alone", removable=False))
            continue
        for p in sorted(top.iterdir()):
            if top.name == "models":
                entry = _model_entry(p)
                if entry.kind != "lock":
                    out.append(entry)
            elif p.is_symlink():
                out.append(CacheEntry(str(p), "other", tree_bytes(p), "symlink (not followed)"))
            else:
                kind = "calibration" if top.name == "calibration" else "download"
                out.append(CacheEntry(str(p), kind, tree_bytes(p)))
    return out


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p)  # removes links inside as links; never follows them


def clear_cache(entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the removable ``entries``: ``(removed, skipped)``.  A model folder is removed
    under its conversion lock (skipped if a conversion holds it)."""
    removed: list[CacheEntry] = []
    skipped: list[CacheEntry] = []
    for e in entries:
        p = Path(e.path)
        if not e.removable:
            skipped.append(e)
            continue
        if e.kind in ("model", "partial model"):
            lock = FileLock(str(_lock_for(p)))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                e.note = "in use: a conversion is running"
                skipped.append(e)
                continue
            try:
                _remove(p)
            finally:
                lock.release()
        elif e.kind == "stale conversion" and work_owner_alive(p):
            skipped.append(e)
            continue
        else:
            _remove(p)
        removed.append(e)
    return removed, skipped
