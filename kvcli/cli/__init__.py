"""The command-line package: ``app`` registers one module per command; ``options`` holds
what they share.  ``kvcli = "kvcli.cli.app:main"``; ``main`` is re-exported for old
installs whose console script still imports ``kvcli.cli``."""

from .app import app, main

__all__ = ["app", "main"]
