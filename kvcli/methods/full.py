"""``full``: no compression; the reference for every quality figure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..core.budget import Budget
from .base import Method

if TYPE_CHECKING:
    from ..cache import KVCache


@dataclass
class FullCache(Method):
    name: ClassVar[str] = "full"
    description: ClassVar[str] = "no compression (reference)"
    compresses: ClassVar[bool] = False

    def compress(self, cache: KVCache, budget: Budget) -> None:
        return None
