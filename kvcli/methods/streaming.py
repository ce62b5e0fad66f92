"""``streaming``: StreamingLLM, attention sinks plus the most recent tokens."""

import torch

from .base import Method, keep_top


class StreamingLLM(Method):
    name = "streaming"
    description = "StreamingLLM: 4 sink tokens + recent window"

    def compress_layer(self, layer, target: int) -> None:
        b, h = layer.keys.shape[:2]
        zeros = torch.zeros((b, h, layer.length), device=layer.keys.device)
        layer.gather(keep_top(zeros, target, self.n_sink, target))
