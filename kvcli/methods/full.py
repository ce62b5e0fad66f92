"""``full``: no compression; the reference for every quality figure."""

from .base import Method


class FullCache(Method):
    name = "full"
    description = "no compression (reference)"

    def compress(self, cache, budget) -> None:
        return None
