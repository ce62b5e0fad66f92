"""User-facing errors: one clear line, no traceback (the CLI turns these into exit code 2)."""

from __future__ import annotations


class KvcliError(Exception):
    """A failure the user can act on; its message is printed as a single line.

    ``option``: the library parameter the error is about (``"backend"``, ``"model"``, ...),
    when there is one.  Library messages name parameters, never command-line flags; a
    message that starts with the parameter's name reads, on the command line, with the
    flag in its place (``kvcli.cli.options.error_line``).
    """

    exit_code = 2

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option
