"""kvcli: long documents through a language model on limited memory."""

__version__ = "0.1.0"
