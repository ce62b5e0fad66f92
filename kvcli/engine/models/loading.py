"""Loading a model and its tokenizer, offline, with kvcli's attention function installed.

``--model`` takes an embedded model's name (``embedded``, ``smollm2``: converted on first
use, see ``fetch``), a local Hugging Face model directory, or a hub id already in the local
Hugging Face cache (never a download).  ``trust_remote_code=False`` everywhere: a folder
that needs its own code is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...attention import ATTN_NAME
from ...core import defaults
from ...core.errors import KvcliError
from ..memory import tune_allocator
from .config import check_no_remote_code
from .fetch import StatusFn, ensure_converted, print_status
from .registry import embedded, remember

#: New tokens a short answer needs by default: a base model answers in a few words; an
#: instruction-tuned one restates the question in a full sentence first (SmolLM2: ~30).
BASE_ANSWER_TOKENS = 16
CHAT_ANSWER_TOKENS = 48


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel running kvcli's attention
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    is_base: bool  # no chat template: use completion-style prompts
    answer_tokens: int = BASE_ANSWER_TOKENS  # new tokens a short answer needs (see above)
    ref: str = ""  # what ``load_model`` was given (``--model``): how a saved context names the model to load

    @property
    def max_positions(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise KvcliError("device cuda: no CUDA device is available on this machine", option="device")
    if device not in ("cpu", "cuda"):
        raise KvcliError(f"device {device!r} is invalid: use auto, cpu or cuda", option="device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise KvcliError(f"dtype {dtype!r} is invalid: use auto, float32, bfloat16 or float16", option="dtype")
    return table[dtype]


def local_model_path(name: str) -> Path:
    """A model directory: a local path, or a hub id already in the local HF cache (never downloads)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KvcliError(
                f"model {name}: directory has no config.json (not a Hugging Face model directory)", option="model"
            )
        return path
    if path.exists():
        raise KvcliError(f"model {name}: expected a model directory, got a file", option="model")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise KvcliError(
            f"model {name}: not an embedded model, a local directory or in the local Hugging Face cache "
            "(kvcli never downloads from the hub; `kvcli models` lists the embedded ones)",
            option="model",
        ) from None


def model_path(name: str | None, quiet: bool = False, on_status: StatusFn | None = None) -> Path:
    """The directory of model ``name``: an embedded model (converted on first use) or a local one."""
    name = name or defaults.MODEL
    entry = embedded(name)
    if entry is not None:
        return ensure_converted(entry, on_status or print_status(quiet))
    return local_model_path(name)


def embedded_model_dir(quiet: bool = False, on_status: StatusFn | None = None) -> Path:
    """The default embedded model's converted directory, converting it on first use."""
    return model_path(defaults.MODEL, quiet=quiet, on_status=on_status)


def _cannot_load(name: str, what: str, exc: Exception) -> KvcliError:
    text = str(exc)
    if "trust_remote_code" in text:
        return KvcliError(
            f"model {name}: its {what} needs code from the model folder; kvcli never runs it", option="model"
        )
    first = text.splitlines()[0][:200] if text else ""
    return KvcliError(f"model {name}: cannot load its {what} ({type(exc).__name__}: {first})", option="model")


def _tokenizer(path: Path, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise _cannot_load(name, "tokenizer", exc) from None


def load_tokenizer(name: str | None = None, quiet: bool = False, on_status: StatusFn | None = None) -> Any:
    """The tokenizer alone (what a parent process needs when each method runs in a child)."""
    name = name or defaults.MODEL
    path = model_path(name, quiet=quiet, on_status=on_status)
    check_no_remote_code(path, name)
    return _tokenizer(path, name)


def load_model(
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = False,
    on_status: StatusFn | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer with kvcli's attention function installed.

    ``on_status``: progress of an embedded model's first-run conversion (default: a line
    per step on stderr unless ``quiet``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = name or defaults.MODEL
    entry = embedded(name)
    if entry is not None and entry.float16_overflows and dt == torch.float16:
        raise KvcliError(
            f"dtype float16: {entry.name} overflows in float16 (its logits become inf/NaN, measured); "
            "use bfloat16 or float32",
            option="dtype",
        )
    path = model_path(name, quiet=quiet, on_status=on_status)
    check_no_remote_code(path, name)
    tune_allocator()
    tok = _tokenizer(path, name)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dt, attn_implementation=ATTN_NAME, trust_remote_code=False
        )
    except Exception as exc:  # a broken directory must not print a traceback
        raise _cannot_load(name, "weights", exc) from None
    model.to(dev).eval()
    if entry is None:
        remember(name, path.resolve())
        is_base = not getattr(tok, "chat_template", None)
        answer = BASE_ANSWER_TOKENS if is_base else CHAT_ANSWER_TOKENS
        label = name
    else:
        is_base, answer, label = entry.is_base, entry.answer_tokens, entry.label
    return LoadedModel(
        model=model,
        tokenizer=tok,
        name=label,
        device=dev,
        dtype=dt,
        is_base=is_base,
        answer_tokens=answer,
        ref=entry.name if entry is not None else str(path.resolve()) if Path(name).expanduser().is_dir() else name,
    )


def wrap_model(model: Any, tokenizer: Any, name: str = "custom", is_base: bool = True) -> LoadedModel:
    """Use an in-process model (tests, benchmarks) with kvcli's attention function."""
    model.set_attn_implementation(ATTN_NAME)
    tune_allocator()
    p = next(model.parameters())
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        name=name,
        device=p.device,
        dtype=p.dtype,
        is_base=is_base,
        answer_tokens=BASE_ANSWER_TOKENS if is_base else CHAT_ANSWER_TOKENS,
    )
