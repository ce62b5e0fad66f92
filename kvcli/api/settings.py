"""Budget presets: named YAML files bundling a method, a budget and the method's options.

Built-in presets live in the repository's top-level ``presets/`` folder, installed as the
package ``kvcli_presets`` so a non-editable install finds them.  Explicit settings (the
command line's flags) override a preset's values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import yaml

from ..core import defaults
from ..core.budget import Budget, check_chunk_size, parse_budget
from ..core.errors import KvcliError
from ..core.fileio import read_text_file
from ..methods import make_method, method_names, normalize_options, split_options

KEYS = {"description", "method", "budget", "allocation", "scoring", "chunk_size", "options"}
SCORING_NAMES = ("auto", *defaults.SCORINGS)


@dataclass
class Settings:
    method: str = defaults.METHOD
    budget: Budget = field(default_factory=lambda: parse_budget(defaults.BUDGET))
    chunk_size: int = defaults.CHUNK_SIZE
    options: dict = field(default_factory=dict)
    scoring: str = defaults.SCORING  # see kvcli.engine.scoring; auto is resolved at prefill
    preset: str | None = None
    description: str = ""


def builtin_presets() -> dict[str, Path]:
    root = resources.files("kvcli_presets")
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def load_preset(ref: str) -> Settings:
    """A preset by built-in name or YAML path, its budget as its method runs it; errors name
    the file and the key."""
    return _ranked_or_uniform(_read_preset(ref))


def _read_preset(ref: str) -> Settings:
    """A preset as its file says it (an allocation it does not name stays ``auto``)."""
    path = Path(ref)
    table = builtin_presets()
    if ref in table:
        path = table[ref]
    elif not (ref.endswith((".yaml", ".yml")) or path.exists()):
        raise KvcliError(f"unknown preset {ref!r}; built-in presets: {', '.join(sorted(table))} (or give a .yaml file)")
    try:
        data = yaml.safe_load(read_text_file(path, "preset file", limit=1 << 20))
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
    return _fill_preset(s, data, path)


def _ranked_or_uniform(s: Settings) -> Settings:
    """The budget as the method will run it (``Method.budget_for``, which the engine applies too)."""
    s.budget = make_method(s.method, **s.options).budget_for(s.budget)
    return s


def _fill_preset(s: Settings, data: dict, path: Path) -> Settings:
    if "method" in data:
        if data["method"] not in method_names():
            raise KvcliError(
                f"preset {path}: key 'method': unknown method {data['method']!r} (valid: {', '.join(method_names())})"
            )
        s.method = data["method"]
    if "budget" in data:
        try:
            s.budget = parse_budget(data["budget"])
        except KvcliError as exc:
            raise KvcliError(f"preset {path}: key 'budget': {exc}") from None
    if "allocation" in data:
        try:
            s.budget = replace(s.budget, allocation=data["allocation"])
        except KvcliError as exc:
            raise KvcliError(f"preset {path}: key 'allocation': {exc}") from None
    if "scoring" in data:
        try:
            s.scoring = check_scoring(data["scoring"])
        except KvcliError as exc:
            raise KvcliError(f"preset {path}: key 'scoring': {exc}") from None
    if "chunk_size" in data:
        c = data["chunk_size"]
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise KvcliError(f"preset {path}: key 'chunk_size': must be a positive integer, got {c!r}")
        s.chunk_size = c
    opts = data.get("options") or {}
    if not isinstance(opts, dict):
        raise KvcliError(f"preset {path}: key 'options': expected a mapping")
    try:
        s.options = normalize_options(s.method, opts)
        make_method(s.method, **s.options)
    except KvcliError as exc:
        raise KvcliError(f"preset {path}: key 'options': {exc}") from None
    return s


def resolve_settings(
    preset: str | None = None,
    method: str | None = None,
    budget: str | float | Budget | None = None,
    chunk_size: int | None = None,
    options: dict | None = None,
    scoring: str | None = None,
    allocation: str | None = None,
) -> Settings:
    """Preset values first, then explicit settings on top; validated before any model loads.

    ``options``: ``KEY`` / ``METHOD.KEY`` entries (``-o``), as every command reads them
    (``kvcli.methods.split_options``); they override the preset's for the same option."""
    # read, not resolved: "auto" becomes the allocation of the method that runs (below)
    s = _read_preset(preset) if preset else Settings()
    if method is not None and method != s.method:
        if method not in method_names():
            make_method(method)  # the one-line "unknown method" error
        s.method = method
        s.options = {}  # a preset's options belong to its own method
    if budget is not None:  # a preset's allocation survives a budget given as a number
        parsed = budget if isinstance(budget, Budget) else parse_budget(budget)
        if not isinstance(budget, Budget) and ":" not in str(budget):
            parsed = replace(parsed, allocation=s.budget.allocation)
        s.budget = parsed
    if allocation is not None:
        s.budget = replace(s.budget, allocation=allocation)
    if scoring is not None:
        s.scoring = check_scoring(scoring)
    if chunk_size is not None:
        check_chunk_size(chunk_size)
        s.chunk_size = chunk_size
    s.options.update(normalize_options(s.method, split_options(options or {}, [s.method])[s.method]))
    s.budget = make_method(s.method, **s.options).budget_for(s.budget)  # a bad option: a clear error now
    return s


def check_scoring(name: object) -> str:
    if name not in SCORING_NAMES:
        raise KvcliError(f"scoring {name!r} is unknown: use one of {', '.join(SCORING_NAMES)}", option="scoring")
    return str(name)


# ---- listing ----------------------------------------------------------------------------------------
PRESET_ORDER = ("lossless", "balanced", "compact", "pod", "pod-compact", "streaming")


@dataclass
class PresetInfo:
    """One built-in preset as ``kvcli presets`` lists it; ``available`` False says why in ``reason``."""

    name: str
    method: str
    budget: str
    chunk_size: int | None
    options: dict
    description: str
    available: bool = True
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def list_presets() -> list[PresetInfo]:
    """Every built-in preset; one that does not load (e.g. its method is not written yet) is listed as such."""
    table = builtin_presets()
    names = [n for n in PRESET_ORDER if n in table] + sorted(n for n in table if n not in PRESET_ORDER)
    rows = []
    for name in names:
        try:
            s = load_preset(name)
            rows.append(PresetInfo(name, s.method, str(s.budget), s.chunk_size, s.options, s.description))
        except KvcliError as exc:
            try:
                data = yaml.safe_load(table[name].read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                data = None
            data = data if isinstance(data, dict) else {}
            reason = str(exc).split(": ", 1)[-1] if str(exc).startswith("preset ") else str(exc)
            rows.append(
                PresetInfo(
                    name,
                    str(data.get("method", "?")),
                    str(data.get("budget", "?")),
                    data.get("chunk_size"),
                    data.get("options") or {},
                    str(data.get("description", "")),
                    available=False,
                    reason=reason,
                )
            )
    return rows
