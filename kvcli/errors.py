"""User-facing errors: one clear line, no traceback (the CLI turns these into exit code 2)."""


class KvcliError(Exception):
    """A failure the user can act on; its message is printed as a single line."""

    exit_code = 2
