"""Budget presets: named YAML files bundling a method, a budget and the method's options.

Built-in presets live in the repository's top-level ``presets/`` folder, installed as the
package ``kvcli_presets`` so a non-editable install finds them.  Explicit command-line
flags override a preset's values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .budget import Budget, parse_budget
from .errors import KvcliError

KEYS = {"description", "method", "budget", "chunk_size", "options"}
DEFAULT_METHOD = "full"
DEFAULT_BUDGET = "1.0"
DEFAULT_CHUNK = 512


@dataclass
class Settings:
    method: str = DEFAULT_METHOD
    budget: Budget = field(default_factory=lambda: parse_budget(DEFAULT_BUDGET))
    chunk_size: int = DEFAULT_CHUNK
    options: dict = field(default_factory=dict)
    preset: str | None = None
    description: str = ""


def builtin_presets() -> dict[str, Path]:
    root = resources.files("kvcli_presets")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_preset(ref: str) -> Settings:
    """A preset by built-in name or YAML path; errors name the file and the key."""
    from .methods import make_method, method_names

    path = Path(ref)
    table = builtin_presets()
    if ref in table:
        path = table[ref]
    elif not (ref.endswith((".yaml", ".yml")) or path.exists()):
        raise KvcliError(f"unknown preset {ref!r}; built-in presets: {', '.join(sorted(table))} (or give a .yaml file)")
    if not path.is_file():
        raise KvcliError(f"preset file {ref}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise KvcliError(f"preset {path}: invalid YAML{where}") from None
    if not isinstance(data, dict):
        raise KvcliError(f"preset {path}: expected a mapping of keys ({', '.join(sorted(KEYS))})")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise KvcliError(f"preset {path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(KEYS))})")
    s = Settings(preset=str(ref), description=str(data.get("description", "")))
    if "method" in data:
        if data["method"] not in method_names():
            raise KvcliError(f"preset {path}: key 'method': unknown method {data['method']!r} (valid: {', '.join(method_names())})")
        s.method = data["method"]
    if "budget" in data:
        try:
            s.budget = parse_budget(data["budget"])
        except KvcliError as exc:
            raise KvcliError(f"preset {path}: key 'budget': {exc}") from None
    if "chunk_size" in data:
        c = data["chunk_size"]
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise KvcliError(f"preset {path}: key 'chunk_size': must be a positive integer, got {c!r}")
        s.chunk_size = c
    opts = data.get("options") or {}
    if not isinstance(opts, dict):
        raise KvcliError(f"preset {path}: key 'options': expected a mapping")
    s.options = dict(opts)
    try:
        make_method(s.method, **s.options)
    except KvcliError as exc:
        raise KvcliError(f"preset {path}: key 'options': {exc}") from None
    return s


def parse_options(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise KvcliError(f"invalid --option {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise KvcliError(f"invalid --option {pair!r}: cannot parse the value") from None
    return out


def resolve_settings(preset=None, method=None, budget=None, chunk_size=None, options=None) -> Settings:
    """Preset values first, then explicit flags on top; validated before any model loads."""
    from .methods import make_method

    s = load_preset(preset) if preset else Settings()
    if method is not None and method != s.method:
        s.method = method
        s.options = {}  # a preset's options belong to its own method
    if budget is not None:
        s.budget = parse_budget(budget)
    if chunk_size is not None:
        if chunk_size < 1:
            raise KvcliError(f"invalid --chunk-size {chunk_size}: it must be a positive integer")
        s.chunk_size = chunk_size
    s.options.update(parse_options(options))
    make_method(s.method, **s.options)  # unknown method or option: clear error now
    return s
