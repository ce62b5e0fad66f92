"""What ``kvcli models`` says about each known model, from its configuration alone (no weights).

Known models: the embedded ones (converted or not) and the local directories kvcli has
loaded before (``registry.known_models``).  The layer kinds and bytes per token come from
``kvcli.cache.sizing``, the arithmetic the cache itself uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...cache.sizing import cache_shape, text_config
from ...core.errors import KvcliError
from .adapter import list_adapters
from .config import config_location, load_config
from .fetch import converted_dir, is_complete
from .registry import EMBEDDED, known_models
from .store import tree_bytes


@dataclass
class ModelInfo:
    name: str  # what --model takes
    kind: str  # "embedded" | "local"
    path: str  # the converted folder (embedded) or the model folder
    converted: bool | None  # embedded: converted into the cache yet; local: None
    size_bytes: int  # on disk (0 when absent)
    about: str = ""
    architecture: str = ""
    layers: int = 0
    growing_layers: int = 0  # full attention: their cache grows with the document
    sliding_layers: int = 0
    sliding_window: int | None = None
    query_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    max_positions: int = 0
    dtype: str = "float32"
    kv_bytes_per_token: int = 0  # K and V of every growing layer, per document token
    kv_bytes_sliding: int = 0  # what the sliding layers hold at most, whatever the length
    error: str = ""  # why the configuration could not be read
    adapters: list[dict] = field(default_factory=list)  # PoD adapters in kvcli's cache (kvcli adapt)

    def as_dict(self) -> dict:
        return asdict(self)


def describe(config: Any, info: ModelInfo, dtype: str) -> ModelInfo:
    """Fill ``info``'s architecture fields from ``config`` at ``dtype``."""
    cfg = text_config(config)
    shape = cache_shape(config, dtype)
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    info.architecture = str((archs or [getattr(cfg, "model_type", "")])[0] or "")
    info.layers = len(shape.layer_kinds)
    info.growing_layers = len(shape.growing_indices)
    info.sliding_layers = info.layers - info.growing_layers
    info.sliding_window = shape.sliding_window if info.sliding_layers else None
    info.query_heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    info.kv_heads = shape.num_kv_heads
    info.head_dim = shape.head_dim
    info.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or 0)
    info.dtype = str(shape.dtype).removeprefix("torch.")
    info.kv_bytes_per_token = info.growing_layers * shape.kv_entry_bytes
    info.kv_bytes_sliding = info.sliding_layers * max((shape.sliding_window or 1) - 1, 0) * shape.kv_entry_bytes
    return info


def _read(info: ModelInfo, ref: Path, dtype: str) -> ModelInfo:
    try:
        return describe(load_config(ref), info, dtype)
    except KvcliError as exc:
        if exc.option == "dtype":
            raise
        info.error = str(exc)
        return info


def _adapters() -> dict[str, list[dict]]:
    """The PoD adapters in kvcli's cache by the ``--model`` they were trained with."""
    out: dict[str, list[dict]] = {}
    for path, header in list_adapters():
        if header is None:
            continue
        ref = str(header["model"].get("ref", ""))
        evals = header.get("evaluations") or []
        out.setdefault(ref, []).append(
            {
                "path": str(path),
                "blocks": header["blocks"],
                "rank": header.get("rank"),
                "steps": header.get("steps"),
                "held_out": evals[-1] if evals else None,
            }
        )
    return out


def list_models(dtype: str = "float32") -> list[ModelInfo]:
    """Every known model, embedded ones first; nothing is loaded, converted or downloaded."""
    rows: list[ModelInfo] = []
    adapters = _adapters()
    for entry in EMBEDDED:
        target = converted_dir(entry)
        done = is_complete(target)
        info = ModelInfo(
            name=entry.name,
            kind="embedded",
            path=str(target),
            converted=done,
            size_bytes=tree_bytes(target) if done else 0,
            about=entry.about,
        )
        info.adapters = adapters.get(entry.name, [])
        rows.append(_read(info, config_location(entry.name), dtype))
    for known in known_models():
        path = Path(known["path"])
        info = ModelInfo(
            name=str(known.get("name") or path), kind="local", path=str(path), converted=None, size_bytes=0
        )
        if not (path / "config.json").is_file():
            info.error = "no longer there (or no config.json)"
            rows.append(info)
            continue
        info.size_bytes = tree_bytes(path, follow_files=True)
        info.adapters = adapters.get(str(path.resolve()), []) + adapters.get(info.name, [])
        rows.append(_read(info, path, dtype))
    return rows
