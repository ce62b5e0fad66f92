"""The command line: parse, call the library, render.  Nothing here computes anything.

Each command lives in its own module and is registered here, in the order ``--help``
lists them.  ``main`` owns the exit status (README, "Exit status"):

* 0 success;
* 1 an internal error (a bug: one line with a hint to report it; ``KVCLI_DEBUG=1`` shows
  the traceback);
* 2 a usage or input error: a bad option or argument, a document or file that cannot be
  used, a bad config file; one line naming the option or the file;
* 130 interrupted (Ctrl-C): one line, ``kvcli: interrupted``; files kvcli writes are
  written whole or not at all (``core.fileio.atomic_write_text``).

Nothing here imports torch: ``--help``, ``--version``, ``methods``, ``presets``,
``config`` and ``info`` stay fast, and argument errors are reported before the model's libraries load.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape

from .. import __version__
from ..core.errors import KvcliError
from . import adapt, ask, batch, cache, calibrate, compress, config, info, methods, models, presets, profile, summarize
from . import eval as eval_cmd
from .options import err, error_line
from .quiet import quiet_libraries

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"kvcli {__version__} ({_versions()})")
        raise typer.Exit()


def _versions() -> str:
    """Versions of what kvcli runs on, read from the installed metadata (nothing imported)."""
    from importlib import metadata

    parts = []
    for dist in ("torch", "transformers"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join([*parts, f"Python {sys.version.split()[0]}"])


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print kvcli's version (and torch's) and exit."
        ),
    ] = False,
) -> None:
    """Long documents through a language model on limited memory (chunked prefill + KV-cache compression).

    Defaults come from flags, then KVCLI_* environment variables, then the config file
    (`kvcli config` shows them). Exit status: 0 ok, 1 internal error, 2 usage or input
    error, 130 interrupted."""


app.command("ask")(ask.ask)
app.command("summarize")(summarize.summarize)
app.command("compress")(compress.compress)
app.command("info")(info.info)
app.command("batch")(batch.batch)
app.command("methods")(methods.methods)
app.command("presets")(presets.presets)
app.command("profile")(profile.profile)
app.command("eval")(eval_cmd.eval_command)
app.command("calibrate")(calibrate.calibrate)
app.command("adapt")(adapt.adapt)
app.command("config")(config.config_command)
app.command("models")(models.models)
app.command("cache")(cache.cache)


# ---- exit status ----------------------------------------------------------------------------------
def _click_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """``(usage errors, aborts)`` of the click that typer runs on: typer >= 0.2x carries its own
    copy (``typer._click``), older typer uses the ``click`` package; both where both exist."""
    usage: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [typer.Abort]
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.ClickException)
    except ImportError:  # an older typer: click itself
        pass
    try:
        import click

        usage.append(click.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


def _usage_line(exc: Any) -> str:
    """Click's message for a usage error, with where to read more, as one line."""
    text = " ".join(str(exc.format_message()).split())
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None)
    return f"{text} (see '{path} --help')" if path else text


def _fail(text: str, code: int, label: str = "error") -> None:
    err.print(f"[red]kvcli: {label}:[/] {escape(text)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _interrupted() -> None:
    err.print("kvcli: interrupted", highlight=False)
    sys.exit(130)


def main() -> None:
    """Entry point: run the app, map every outcome to the exit status above."""
    debug = bool(os.environ.get("KVCLI_DEBUG"))
    quiet_libraries(debug)
    usage, aborts = _click_classes()
    stops: tuple[type[BaseException], ...] = (KeyboardInterrupt, *aborts)
    try:
        code = app(args=batch.ray_argv(sys.argv[1:]), standalone_mode=False, default_map=config.LazyDefaultMap())
    except KvcliError as exc:
        _fail(error_line(exc), exc.exit_code)
    except usage as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``kvcli``: Rich has printed the help
            text = str(getattr(exc, "format_message", lambda: "")())
            if text.strip():  # (without Rich it is the message)
                print(text)
            sys.exit(2)
        _fail(_usage_line(exc), 2)
    except stops:
        _interrupted()
    except BrokenPipeError:  # stdout closed early (``kvcli ... | head``): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except MemoryError:
        _fail("out of memory (try a smaller --budget, --chunk-size or document)", 1)
    except Exception as exc:  # never a traceback for the user; KVCLI_DEBUG=1 shows it
        if debug:
            raise
        msg = " ".join(str(exc).split())[:300]
        _fail(
            f"{type(exc).__name__}: {msg} (a bug in kvcli: please report it, with what KVCLI_DEBUG=1 prints)",
            1,
            "internal error",
        )
    # Not standalone, typer returns what ``typer.Exit`` carried; a Ctrl-C inside a command
    # arrives here as 130 (typer turns KeyboardInterrupt into Exit(130)).
    code = code if isinstance(code, int) else 0
    if code == 130:
        _interrupted()
    sys.exit(code)
