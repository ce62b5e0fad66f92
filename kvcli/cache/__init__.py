"""The cache layer: storage that physically shrinks (``layers``), the ``Cache`` transformers
sees (``kvcache``), and the byte arithmetic both it and the estimate use (``sizing``)."""

from .kvcache import CacheReport, KVCache
from .layers import Clock, GrowingLayer, SharedKeyLayer, WindowLayer

__all__ = ["CacheReport", "Clock", "GrowingLayer", "KVCache", "SharedKeyLayer", "WindowLayer"]
