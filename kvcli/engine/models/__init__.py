"""Models, offline: the embedded ones by name (``registry``), fetched and converted once into
kvcli's cache (``fetch``), configurations read without weights (``config``, ``info``), and
loading with kvcli's attention function (``loading``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .config import config_location, load_config  # noqa: E402
from .fetch import StatusFn, converted_dir, ensure_converted, is_complete  # noqa: E402
from .info import ModelInfo, list_models  # noqa: E402
from .loading import (  # noqa: E402
    LoadedModel,
    embedded_model_dir,
    load_model,
    load_tokenizer,
    local_model_path,
    model_path,
    resolve_device,
    resolve_dtype,
    wrap_model,
)
from .registry import EMBEDDED, EmbeddedModel, embedded, embedded_names  # noqa: E402


def converted_model_dir():
    """Where the default embedded model's conversion lives (it may not exist yet)."""
    return converted_dir(EMBEDDED[0])


__all__ = [
    "EMBEDDED",
    "EmbeddedModel",
    "LoadedModel",
    "ModelInfo",
    "StatusFn",
    "config_location",
    "converted_dir",
    "converted_model_dir",
    "embedded",
    "embedded_model_dir",
    "embedded_names",
    "ensure_converted",
    "is_complete",
    "list_models",
    "load_config",
    "load_model",
    "load_tokenizer",
    "local_model_path",
    "model_path",
    "resolve_device",
    "resolve_dtype",
    "wrap_model",
]
