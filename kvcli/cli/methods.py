"""``kvcli methods``: the compression methods and what each keeps."""

from __future__ import annotations


def methods() -> None:
    """List the compression methods."""
    from ..methods import describe_methods

    for name, description in describe_methods():
        print(f"{name:16s} {description}")
