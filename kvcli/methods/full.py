"""``full``: no compression; the reference for every quality figure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..cache import KVCache
from ..core.budget import Budget
from .base import Method


@dataclass
class FullCache(Method):
    name: ClassVar[str] = "full"
    description: ClassVar[str] = "no compression (reference)"
    compresses: ClassVar[bool] = False

    def compress(self, cache: KVCache, budget: Budget) -> None:
        return None
