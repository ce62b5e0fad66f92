"""PoD adapters: low-rank deltas on the member layers' query and key projections.

``kvcli adapt`` trains them (``kvcli.adapt``) so that a PoD member layer learns to attend
with its block's shared distant keys; this module is what inference needs: the file, where
it lives, whether it fits a model and a grouping, and applying it to a loaded model.

File: ``cache_dir()/adapters/<model>-<grouping>.safetensors``, ``<model>`` a digest of the
model's configuration and weights (``model_digest``), ``<grouping>`` of the PoD blocks.
Tensors ``layers.<i>.<q_proj|k_proj>.lora_a`` ``[r, in]`` and ``.lora_b`` ``[out, r]``; the
delta of a projection's weight is ``scale * lora_b @ lora_a``.  The safetensors metadata
key ``kvcli_adapter`` holds a JSON header: format, model digest and name, blocks, rank,
scale, the PoD settings it was trained with, steps and the loss curve.

Applying (``Adapter.applied``) swaps the members' projection weights for merged copies
(merged once; the modules are found once per model) for the duration of a forward and puts
the originals back, so one loaded model serves ``pod`` with and without the adapter and
every other method in the same process (eval).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core.errors import KvcliError
from ...core.fileio import atomic_write_bytes, cache_dir
from .fingerprint import config_hash, weights_hash

FORMAT = "kvcli-pod-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "kvcli_adapter"
PROJECTIONS = ("q_proj", "k_proj")
_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.(q_proj|k_proj)$")

_digests: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def model_digest(model: Any) -> str:
    """What an adapter is keyed by: the model's configuration and (sampled) weights, as
    ``fingerprint`` hashes them; computed once per model object."""
    known = _digests.get(model)
    if known is None:
        known = hashlib.sha256(f"{config_hash(model.config)}:{weights_hash(model)}".encode()).hexdigest()
        _digests[model] = known
    return known


def grouping_key(blocks: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps([list(map(int, b)) for b in blocks]).encode()).hexdigest()[:12]


def adapters_dir() -> Path:
    return cache_dir() / "adapters"


def adapter_path(digest: str, blocks: list[list[int]]) -> Path:
    return adapters_dir() / f"{digest[:16]}-{grouping_key(blocks)}.safetensors"


def members_of(blocks: list[list[int]]) -> list[int]:
    """The layers an adapter changes: every block's layers after its anchor."""
    return [i for b in blocks for i in b[1:]]


def projections(model: Any, layers: list[int]) -> dict[tuple[int, str], torch.nn.Module]:
    """``{(layer, "q_proj"|"k_proj"): module}`` of ``layers`` (decoder layers found by name)."""
    found: dict[tuple[int, str], torch.nn.Module] = {}
    for name, module in model.named_modules():
        hit = _PROJ.search(name)
        if hit and int(hit.group(1)) in layers:
            found[(int(hit.group(1)), hit.group(2))] = module
    missing = [(i, p) for i in layers for p in PROJECTIONS if (i, p) not in found]
    if missing:
        raise KvcliError(f"adapter: the model has no {missing[0][1]} in layer {missing[0][0]}", option="adapter")
    return found


def _bad(path: Path, why: str) -> KvcliError:
    return KvcliError(f"adapter {path}: not a usable kvcli adapter ({why})", option="adapter")


@dataclass
class Adapter:
    path: Path
    header: dict
    deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (lora_a, lora_b)
    _merged: dict[tuple[int, str], torch.nn.Parameter] = field(default_factory=dict, repr=False)
    # the member projections, found once per model (``applied`` runs on every forward)
    _modules: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    @property
    def blocks(self) -> list[list[int]]:
        return self.header["blocks"]

    @property
    def scale(self) -> float:
        return float(self.header["scale"])

    def mismatch(self, model: Any, blocks: list[list[int]]) -> str | None:
        """Why this adapter does not fit ``model`` with ``blocks`` (None: it fits)."""
        if self.header.get("model", {}).get("digest") != model_digest(model):
            return f"trained for another model ({self.header.get('model', {}).get('name', '?')})"
        if self.blocks != blocks:
            return f"trained for the blocks {self.blocks}, this run uses {blocks}"
        return None

    def delta(self, key: tuple[int, str]) -> torch.Tensor:
        a, b = self.deltas[key]
        return self.scale * (b.float() @ a.float())

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """The member projections' weights replaced by merged ones, the originals put back after."""
        mods = self._modules.get(model)
        if mods is None:
            mods = self._modules[model] = projections(model, members_of(self.blocks))
        if not self._merged:
            with torch.no_grad():
                for key, mod in mods.items():
                    w: torch.Tensor = mod._parameters["weight"]  # type: ignore[assignment]
                    merged = (w.float() + self.delta(key).to(w.device)).to(w.dtype)
                    self._merged[key] = torch.nn.Parameter(merged, requires_grad=False)
        saved = {key: mod._parameters["weight"] for key, mod in mods.items()}
        try:
            for key, mod in mods.items():
                mod._parameters["weight"] = self._merged[key]
            yield
        finally:
            for key, mod in mods.items():
                mod._parameters["weight"] = saved[key]


def save_adapter(path: Path, header: dict, deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """Write an adapter file atomically (replacing one that is there)."""
    from safetensors.torch import save

    tensors = {}
    for (layer, proj), (a, b) in sorted(deltas.items()):
        tensors[f"layers.{layer}.{proj}.lora_a"] = a.detach().float().cpu().contiguous()
        tensors[f"layers.{layer}.{proj}.lora_b"] = b.detach().float().cpu().contiguous()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json.dumps(meta)}), replace=True)


def read_header(path: Path) -> dict:
    """The JSON header alone (``kvcli models`` lists adapters without reading their tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        header = json.loads(meta[METADATA_KEY])
    except FileNotFoundError:
        raise KvcliError(f"adapter {path}: no such file", option="adapter") from None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise _bad(path, type(exc).__name__) from None
    except Exception as exc:  # the safetensors reader's own errors (a truncated or foreign file)
        raise _bad(path, type(exc).__name__) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _bad(path, "not an adapter header")
    if header.get("format_version") != FORMAT_VERSION:
        raise _bad(path, f"format version {header.get('format_version')!r}, this kvcli reads {FORMAT_VERSION}")
    blocks = header.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, list) and b for b in blocks):
        raise _bad(path, "no blocks")
    if not isinstance(header.get("scale"), int | float) or not isinstance(header.get("model"), dict):
        raise _bad(path, "no scale or model")
    return header


def load_adapter(path: str | Path) -> Adapter:
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise _bad(path, type(exc).__name__) from None
    deltas = {}
    for layer in members_of(header["blocks"]):
        for proj in PROJECTIONS:
            a = tensors.get(f"layers.{layer}.{proj}.lora_a")
            b = tensors.get(f"layers.{layer}.{proj}.lora_b")
            if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise _bad(path, f"layer {layer} {proj}: missing or mis-shaped")
            deltas[(layer, proj)] = (a, b)
    return Adapter(path=path, header=header, deltas=deltas)


def adapter_for(model: Any, choice: str, blocks: list[list[int]]) -> Adapter | None:
    """The adapter a PoD run uses: ``choice`` ``"none"``; ``"auto"``: the one in kvcli's
    cache for this model and grouping, if there is one; else a file, which must fit (a
    one-line error says why not)."""
    if choice == "none":
        return None
    if choice == "auto":
        path = adapter_path(model_digest(model), blocks)
        if not path.is_file():
            return None
        try:
            found = load_adapter(path)
        except KvcliError:
            return None  # a broken cache entry: run without it (kvcli models shows it)
        return found if found.mismatch(model, blocks) is None else None
    adapter = load_adapter(choice)
    why = adapter.mismatch(model, blocks)
    if why is not None:
        raise KvcliError(f"adapter {choice}: {why}", option="adapter")
    return adapter


def list_adapters() -> list[tuple[Path, dict | None]]:
    """Every adapter file in kvcli's cache with its header (None: unreadable)."""
    root = adapters_dir()
    out: list[tuple[Path, dict | None]] = []
    for path in sorted(root.glob("*.safetensors")) if root.is_dir() else []:
        try:
            out.append((path, read_header(path)))
        except KvcliError:
            out.append((path, None))
    return out
