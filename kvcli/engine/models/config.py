"""A model's configuration without its weights: where it is, and reading it.

``kvcli models`` and ``profile --estimate`` read configurations only.  An embedded model
that is not converted yet is described by the ``config.json`` bundled beside the registry
(the one its conversion writes).  No model folder's own code ever runs
(``trust_remote_code=False``; ``check_no_remote_code`` says so in one line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...core import defaults
from ...core.errors import KvcliError
from .fetch import converted_dir, is_complete
from .registry import embedded


def read_json(path: Path, ref: str | Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvcliError(
            f"model {ref}: cannot read {path.name} as JSON ({str(exc).splitlines()[0][:120]})", option="model"
        ) from None
    if not isinstance(data, dict):
        raise KvcliError(f"model {ref}: {path.name} is not a JSON object", option="model")
    return data


def _known_type(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def check_no_remote_code(path: Path, ref: str | Path) -> None:
    """Refuse a folder whose model or tokenizer exists only as code inside it (``auto_map``
    to a type transformers does not know): kvcli never runs a model folder's code."""
    config = read_json(path / "config.json", ref)
    if config.get("auto_map") and not _known_type(config.get("model_type")):
        raise KvcliError(
            f"model {ref}: it needs its own code to run (config.json auto_map, model type "
            f"{config.get('model_type')!r} unknown to transformers); kvcli never runs code from a model folder",
            option="model",
        )
    tok_path = path / "tokenizer_config.json"
    if tok_path.is_file():
        tok = read_json(tok_path, ref)
        auto = tok.get("auto_map")
        if auto and not (path / "tokenizer.json").is_file():
            raise KvcliError(
                f"model {ref}: its tokenizer needs its own code (tokenizer_config.json auto_map) and there is no "
                "tokenizer.json; kvcli never runs code from a model folder",
                option="model",
            )


def load_config(ref: str | Path) -> Any:
    """A model configuration from ``config.json`` or a model directory, without weights.

    Transformers' own config class is used when it knows the model type (it derives fields
    such as ``layer_types`` exactly as a loaded model would); otherwise the raw JSON.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise KvcliError(f"model {ref}: directory has no config.json", option="model")
    elif not path.is_file():
        raise KvcliError(
            f"model {ref}: no such file or directory (give a config.json or a model directory)", option="model"
        )
    data = read_json(path, ref)
    if not _known_type(data.get("model_type")):
        return data
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception:  # a partial config: read the fields ourselves
        return data


def config_location(name: str | None) -> Path:
    """Where model ``name``'s configuration is, converting and downloading nothing: an
    embedded model's converted folder (its bundled ``config.json`` before conversion), a
    ``config.json`` or model directory, or a hub id already in the local Hugging Face cache."""
    name = name or defaults.MODEL
    entry = embedded(name)
    if entry is not None:
        target = converted_dir(entry)
        return target if is_complete(target) else entry.bundled_config
    path = Path(name).expanduser()
    if not path.exists():
        from huggingface_hub import snapshot_download

        try:  # a hub id already in the local Hugging Face cache (never downloads)
            path = Path(snapshot_download(name, local_files_only=True, allow_patterns=["config.json"]))
        except Exception:
            raise KvcliError(
                f"model {name}: no such file or directory, and not in the local Hugging Face cache", option="model"
            ) from None
    return path
