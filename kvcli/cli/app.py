"""The command line: parse, call the library, render.  Nothing here computes anything.

Each command lives in its own module and is registered here, in the order ``--help``
lists them.  Every failure is one line on stderr and a non-zero exit (``main``).
"""

from __future__ import annotations

import os
import sys

import click
import typer
from rich.markup import escape

from ..core.errors import KvcliError
from . import ask, calibrate, methods, presets, profile, summarize
from . import eval as eval_cmd
from .options import err, error_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Long documents through a language model on limited memory (chunked prefill + KV-cache compression).",
)
app.command("ask")(ask.ask)
app.command("summarize")(summarize.summarize)
app.command("methods")(methods.methods)
app.command("presets")(presets.presets)
app.command("profile")(profile.profile)
app.command("eval")(eval_cmd.eval_command)
app.command("calibrate")(calibrate.calibrate)


def main() -> None:
    """Entry point: every failure is one line on stderr and a non-zero exit."""
    try:
        app(standalone_mode=False)
    except KvcliError as exc:
        err.print(f"[red]kvcli: error:[/] {escape(error_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        err.print(f"[red]kvcli: error:[/] {escape(exc.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err.print("kvcli: interrupted", highlight=False)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # never a traceback for the user; KVCLI_DEBUG=1 shows it
        if os.environ.get("KVCLI_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err.print(
            f"[red]kvcli: internal error:[/] {type(exc).__name__}: {escape(msg)} (set KVCLI_DEBUG=1 for details)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
