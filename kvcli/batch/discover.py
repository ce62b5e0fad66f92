"""The documents a batch covers: files, folders (searched recursively) and glob patterns.

Order is stable: the arguments in the order given, each folder's or pattern's matches
sorted by path; a document named twice (the same resolved file) runs once.  Folders yield
only files with a document extension; hidden files and folders are skipped.  A name that
matches nothing is an error before anything loads; a file that cannot be read as a
document is that document's error line.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ..core.documents import HTML_EXTENSIONS, TEXT_EXTENSIONS
from ..core.errors import KvcliError

#: What a folder search picks up (an explicitly named file may have any extension).
DOCUMENT_EXTENSIONS = frozenset({*TEXT_EXTENSIONS, *HTML_EXTENSIONS, ".pdf"})
_GLOB_CHARS = set("*?[")


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if Path(name).suffix.lower() in DOCUMENT_EXTENSIONS and not _hidden(path, root) and path.is_file():
                found.append(path)
    return sorted(found)


def discover(names: list[str]) -> list[str]:
    """The documents ``names`` cover, as paths (strings), in a stable order, each once."""
    if not names:
        raise KvcliError("no documents given: name files, folders or glob patterns")
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir():
            matches = _folder(path)
            if not matches:
                raise KvcliError(
                    f"{name}: folder holds no documents ({', '.join(sorted(DOCUMENT_EXTENSIONS))})", option="docs"
                )
        elif _GLOB_CHARS & set(name) and not path.exists():
            hits = sorted(glob.glob(str(path), recursive=True))
            matches = []
            for hit in hits:
                p = Path(hit)
                matches.extend(_folder(p) if p.is_dir() else [p])
            if not matches:
                raise KvcliError(f"{name}: no documents match this pattern", option="docs")
        elif path.exists() or path.is_symlink():
            matches = [path]  # a file; one that cannot be read gets an error line
        else:
            raise KvcliError(f"{name}: no such file, folder or matching pattern", option="docs")
        for match in matches:
            key = os.path.realpath(match)
            if key not in seen:
                seen.add(key)
                out.append(str(match))
    return out
