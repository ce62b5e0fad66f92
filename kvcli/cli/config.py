"""Defaults from the environment and the user's config file, and ``kvcli config`` to see them.

Key by key, the first that sets it wins: a flag, then a ``KVCLI_<KEY>`` environment
variable, then the config file (TOML, in the user's config directory: ``kvcli config
--path``; ``KVCLI_CONFIG`` names another file), then kvcli's built-in default.  A preset
expands where it is given: ``--preset`` on the command line replaces a method, budget or
chunk size from the environment or the file, and ``KVCLI_METHOD`` overrides the method of
a preset named in the file, as ``--preset P --method M`` does on one command line.

A bad value is one line naming the file and key (or the variable), exit status 2, before
anything loads.  Example file::

    model = "path/to/model"
    method = "kvmerger"
    budget = 0.5
    chunk_size = 512
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..core import defaults
from ..core.errors import KvcliError
from ..core.fileio import read_text_file
from . import checks

if TYPE_CHECKING:
    from ..api.settings import Settings

ENV_PREFIX = "KVCLI_"


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KvcliError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def _method(value: Any) -> str:
    from ..methods import method_names

    name = _text(value)
    if name not in method_names():
        raise KvcliError(f"unknown method {name!r}; valid methods: {', '.join(method_names())}")
    return name


def _budget(value: Any) -> str:
    from ..core.budget import parse_budget

    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise KvcliError(f"expected a ratio in (0, 1] or a token count, got {value!r}")
    return str(parse_budget(value))


def _preset(value: Any) -> str:
    from ..api.settings import load_preset

    name = _text(value)
    load_preset(name)  # a name that is not a preset, or a bad preset file: said now
    return name


def _choices(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        return checks.choice("value", _text(value), choices).strip()

    return check


def _chunk(value: Any) -> int:
    return checks.chunk_size("value", value)


@dataclass(frozen=True)
class Key:
    name: str
    flag: str
    default: Any
    check: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


KEYS = (
    Key("model", "--model", defaults.MODEL, _text, "model: embedded, a local directory or a cached hub id"),
    Key("method", "--method", defaults.METHOD, _method, "compression method (ask, summarize, batch)"),
    Key("budget", "--budget", defaults.BUDGET, _budget, "token budget (ask, summarize, batch)"),
    Key("preset", "--preset", None, _preset, "preset name or YAML file (ask, summarize, batch)"),
    Key("scoring", "--scoring", defaults.SCORING, _text, "where scored methods get statistics (ask, summarize, batch)"),
    Key("chunk_size", "--chunk-size", defaults.CHUNK_SIZE, _chunk, "prefill chunk in tokens"),
    Key("device", "--device", "auto", _choices(checks.DEVICES), "auto, cpu or cuda"),
    Key("dtype", "--dtype", "auto", _choices(checks.DTYPES), "auto, float32, bfloat16 or float16"),
    Key("attn", "--attn", "auto", _choices(checks.BACKENDS), "attention backend"),
)
BY_NAME = {k.name: k for k in KEYS}

#: What a preset bundles: given at one level, it replaces these from the levels below.
PRESET_KEYS = ("preset", "method", "budget", "chunk_size")
#: Keys each command takes as plain defaults (click's default map: a flag still wins).
#: ``ask``/``summarize`` (and ``profile``'s chunk size) go through ``layered`` instead,
#: because a preset must be able to override them.
PLAIN_KEYS = {
    "ask": ("model", "device", "dtype", "attn", "scoring"),
    "summarize": ("model", "device", "dtype", "attn", "scoring"),
    "batch": ("model", "device", "dtype", "attn", "scoring"),
    "compress": ("model", "device", "dtype", "attn", "scoring"),
    "profile": ("model", "device", "dtype", "attn"),
    "eval": ("model", "device", "dtype", "attn", "chunk_size"),
    "calibrate": ("model", "device", "dtype", "attn", "chunk_size"),
}


def config_path() -> Path:
    """``$KVCLI_CONFIG``, else ``config.toml`` in the user's config directory."""
    if os.environ.get("KVCLI_CONFIG"):
        return Path(os.environ["KVCLI_CONFIG"]).expanduser()
    import platformdirs

    return platformdirs.user_config_path("kvcli") / "config.toml"


@dataclass
class Defaults:
    """The checked values of each level: ``file`` (from ``path``) and ``env``."""

    path: Path
    file: dict[str, Any]
    env: dict[str, Any]

    def get(self, name: str) -> tuple[Any, str]:
        """``(value, where it came from)`` below the command line."""
        key = BY_NAME[name]
        if name in self.env:
            return self.env[name], f"environment {key.env}"
        if name in self.file:
            return self.file[name], f"config file {self.path}"
        return key.default, "default"

    def plain(self, command: str) -> dict[str, Any]:
        """The plain defaults of ``command`` that the environment or the file set."""
        out = {}
        for name in PLAIN_KEYS.get(command, ()):
            value, source = self.get(name)
            if source != "default":
                out[name] = value
        return out

    def layered(self, **flags: Any) -> dict[str, Any]:
        """``preset``/``method``/``budget``/``chunk_size`` after the levels (file, environment,
        flags; ``None`` = not given): a preset replaces what the levels below said about what
        it bundles, other values win key by key.  Keys absent from ``flags`` are not taken."""
        out: dict[str, Any] = {}
        for level in (self.file, self.env, flags):
            given = {k: level[k] for k in flags if level.get(k) is not None}
            if "preset" in given:
                out = {}
            out.update(given)
        return {k: out.get(k) for k in flags}


def _check(name: str, value: Any, where: str) -> Any:
    try:
        return BY_NAME[name].check(value)
    except KvcliError as exc:
        raise KvcliError(f"{where}: {exc}") from None


def load_defaults() -> Defaults:
    """Read and check the config file and the ``KVCLI_*`` variables (one-line errors naming
    the file and key, or the variable)."""
    path = config_path()
    file: dict[str, Any] = {}
    if os.environ.get("KVCLI_CONFIG") or path.exists():
        text = read_text_file(path, "config file", limit=1 << 20)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise KvcliError(f"config file {path}: invalid TOML ({' '.join(str(exc).split())})") from None
        for name, value in data.items():
            if name not in BY_NAME:
                raise KvcliError(f"config file {path}: unknown key {name!r} (keys: {', '.join(BY_NAME)})")
            file[name] = _check(name, value, f"config file {path}: key {name!r}")
    env: dict[str, Any] = {}
    for key in KEYS:
        raw = os.environ.get(key.env)
        if raw is not None and raw.strip():
            env[key.name] = _check(key.name, raw, f"environment {key.env}={raw!r}")
    return Defaults(path=path, file=file, env=env)


class LazyDefaultMap(Mapping):
    """Click's ``default_map`` for the app: ``map[command]`` reads the defaults only when a
    command that takes them runs (``--help``, ``methods``, ``config`` never fail on a bad
    file)."""

    def __init__(self) -> None:
        self._defaults: Defaults | None = None

    def __getitem__(self, command: str) -> dict[str, Any]:
        if command not in PLAIN_KEYS:
            raise KeyError(command)
        if self._defaults is None:
            self._defaults = load_defaults()
        return self._defaults.plain(command)

    def __iter__(self) -> Iterator[str]:
        return iter(PLAIN_KEYS)

    def __len__(self) -> int:
        return len(PLAIN_KEYS)


# ---- kvcli config -------------------------------------------------------------------------------------
def config_command(
    path_only: Annotated[bool, typer.Option("--path", help="Print the config file's path and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the settings as one JSON object.")] = False,
) -> None:
    """Show the effective defaults and where each comes from (environment, config file, built-in)."""
    path = config_path()
    if path_only:
        print(path)
        return
    d = load_defaults()
    rows = []
    for key in KEYS:
        value, source = d.get(key.name)
        rows.append({"key": key.name, "value": value, "source": source, "env": key.env, "flag": key.flag})
    if as_json:
        settings = {r["key"]: {k: r[k] for k in ("value", "source", "env", "flag")} for r in rows}
        print(json.dumps({"path": str(path), "exists": path.is_file(), "settings": settings}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"kvcli defaults (config file: {path}{'' if path.is_file() else ', not present'})",
        title_justify="left",
        caption="A flag wins over the environment, which wins over the config file. A preset replaces the "
        "method, budget and chunk size of the levels below it.",
        caption_justify="left",
    )
    for col in ("key", "value", "from", "variable", "flag"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"], "-" if r["value"] is None else str(r["value"]), r["source"], r["env"], r["flag"])
    Console(highlight=False).print(table)


def run_settings(
    *,
    preset: str | None,
    method: str | None,
    budget: str | None,
    chunk_size: int | None,
    options: dict,
    scoring: str | None = None,
    allocation: str | None = None,
    no_adapter: bool = False,
) -> Settings:
    """A run's method, budget, chunk size, scoring and options: flags over the environment
    over the config file (``Defaults.layered``), checked as the command line allows them.
    ``allocation`` is a flag only (or a preset's); ``no_adapter``: ``--no-adapter`` (PoD
    runs without its adapter)."""
    from ..api.settings import resolve_settings

    if chunk_size is not None:
        checks.chunk_size("--chunk-size", chunk_size)
    given = load_defaults().layered(preset=preset, method=method, budget=budget, chunk_size=chunk_size, scoring=scoring)
    settings = resolve_settings(**given, options=options, allocation=allocation)
    try:
        checks.chunk_size("chunk_size", settings.chunk_size)
    except KvcliError as exc:
        raise KvcliError(f"preset {settings.preset}: {exc}") from None
    if no_adapter:
        from .options import adapter_off

        settings.options.update(adapter_off(settings.method))
    return settings
