"""``streaming``: StreamingLLM, attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Method, keep_top

if TYPE_CHECKING:
    from ..cache import GrowingLayer


@dataclass
class StreamingLLM(Method):
    name: ClassVar[str] = "streaming"
    description: ClassVar[str] = "StreamingLLM: 4 sink tokens + recent window"

    def compress_layer(self, layer: GrowingLayer, target: int) -> None:
        import torch  # here, not at the top: checking options needs no torch

        b, h = layer.keys.shape[:2]
        zeros = torch.zeros((b, h, layer.length), device=layer.keys.device)
        layer.gather(keep_top(zeros, target, self.n_sink, target))
