"""``kvcli cache``: what kvcli keeps in its cache directory, and clearing it."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ..core.errors import KvcliError
from .models import human_bytes
from .options import err


def cache(
    clear: Annotated[bool, typer.Option("--clear", help="Remove what kvcli keeps there (asks first).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="With --clear: do not ask.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries (and what was removed) as JSON.")] = False,
) -> None:
    """List kvcli's cache directory (converted models, calibration profiles, downloads) with sizes.

    The directory is $KVCLI_CACHE_DIR, else the user cache directory (~/.cache/kvcli on
    Linux). --clear never follows a symlink and leaves alone what is not kvcli's."""
    from ..core.fileio import cache_dir
    from ..engine.models.store import clear_cache, list_cache

    if yes and not clear:
        raise KvcliError("--yes goes with --clear")
    root = cache_dir()
    entries = list_cache(root)
    removable = [e for e in entries if e.removable]
    if not clear:
        if as_json:
            print(json.dumps({"cache_dir": str(root), "entries": [e.as_dict() for e in entries]}, indent=2))
            return
        _show(str(root), entries)
        return
    if not removable:
        if as_json:
            print(json.dumps({"cache_dir": str(root), "removed": [], "skipped": [e.as_dict() for e in entries]}))
        else:
            print(f"{root}: nothing to remove")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise KvcliError("--clear asks before removing anything: add --yes to run it without a terminal")
        _show(str(root), removable)
        total = sum(e.size_bytes for e in removable)
        if not typer.confirm(f"Remove these {len(removable)} entries ({human_bytes(total)})?", default=False):
            err.print("kvcli: nothing removed", highlight=False)
            return
    removed, skipped = clear_cache(entries)
    if as_json:
        print(
            json.dumps(
                {
                    "cache_dir": str(root),
                    "removed": [e.as_dict() for e in removed],
                    "skipped": [e.as_dict() for e in skipped],
                },
                indent=2,
            )
        )
        return
    print(f"removed {len(removed)} entries ({human_bytes(sum(e.size_bytes for e in removed))}) from {root}")
    for e in skipped:
        if e.kind != "other":
            print(f"kept {e.path}: {e.note}")


def _show(root: str, entries: list) -> None:
    print(f"{root}")
    if not entries:
        print("  (empty)")
        return
    width = max(len(e.kind) for e in entries)
    for e in entries:
        note = f"  ({e.note})" if e.note else ""
        print(f"  {e.kind:{width}s}  {human_bytes(e.size_bytes):>10s}  {e.path}{note}")
    print(f"  {'total':{width}s}  {human_bytes(sum(e.size_bytes for e in entries)):>10s}")
