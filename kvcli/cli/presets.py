"""``kvcli presets``: the built-in budget presets."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def presets(
    as_json: Annotated[bool, typer.Option("--json", help="Print the presets as JSON on stdout.")] = False,
) -> None:
    """List the built-in budget presets (use one with --preset NAME)."""
    from ..api.settings import list_presets

    rows = list_presets()
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return
    w_name = max([len(r.name) for r in rows] + [6])
    w_method = max([len(r.method) for r in rows] + [6])
    w_budget = max([len(r.budget) for r in rows] + [6])
    print(f"{'preset':{w_name}s}  {'method':{w_method}s}  {'budget':{w_budget}s}  description")
    for r in rows:
        unavailable = "" if r.available else f"  [unavailable: {r.reason}]"
        print(f"{r.name:{w_name}s}  {r.method:{w_method}s}  {r.budget:{w_budget}s}  {r.description}{unavailable}")
