"""The ``.kvc`` file: a compressed context saved to disk, read and checked without torch.

A ``.kvc`` file is a safetensors file (https://huggingface.co/docs/safetensors): an 8-byte
little-endian header length, a JSON header (the tensor table and ``__metadata__``), then the
tensor bytes.  kvcli's own header is one JSON string under ``__metadata__["kvcli"]``; its
fields are ``HEADER_FIELDS``.  No pickle anywhere: a file can name tensors and describe
them, never run code.

This module owns the container and its promises: every failure to read is a one-line
``KvcliError`` naming the file (truncated, corrupted, another format version, a field
missing), and ``checksum`` covers kvcli's header and every tensor's name, dtype, shape and
bytes, so a flipped byte anywhere that matters is caught before anything is loaded.  It
needs no torch: ``kvcli info`` and the checks before a model loads use it alone.  Turning
tensors into a cache is ``kvcli.cache.serialize``; checking a header against a model is
``kvcli.api.saved``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KvcliError

SUFFIX = ".kvc"
FORMAT = "kvcli-context"
FORMAT_VERSION = 1
METADATA_KEY = "kvcli"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a safetensors header this long is not one kvcli wrote

#: Bytes per element of each safetensors dtype kvcli writes or accepts.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

#: kvcli's header: field -> the JSON types it may hold (``None``: null allowed).
HEADER_FIELDS: dict[str, tuple[type | None, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "kvcli_version": (str,),
    "created": (str,),
    "model": (dict,),  # name, ref, config_sha256, tokenizer_sha256, weights_sha256
    "dtype": (str,),
    "method": (str,),
    "method_options": (dict,),
    "budget": (str,),
    "scoring": (str,),
    "scored": (bool,),  # whether scoring ran (a method that ranks nothing, or the full budget: no)
    "chunk_size": (int,),
    "template": (dict,),
    "context_tokens": (int,),
    "truncated_tokens": (int,),
    "sources": (list,),  # [{name, sha256, tokens}]: the document, then each --append
    "layers": (list,),  # per model layer: {kind, length | seen}
    "prefill": (dict,),  # measured figures of the prefill (seconds, chunks, peak bytes)
    "kv_bytes": (int,),
    "kv_bytes_full": (int,),
    "checksum": (str,),
}
MODEL_FIELDS = ("name", "ref", "config_sha256", "tokenizer_sha256", "weights_sha256")
SOURCE_FIELDS = {"name": str, "sha256": str, "tokens": int}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file's table: where its bytes are in the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SavedFile:
    """A ``.kvc`` file, checked: kvcli's header, the tensor table, and where the data starts."""

    name: str  # the path as given (for messages)
    header: dict[str, Any]
    tensors: dict[str, TensorEntry]
    data_start: int
    size: int

    def layer_bytes(self) -> list[int]:
        """Bytes of the tensors of each model layer (``layers.{i}.*``), from the table."""
        out = [0] * len(self.header["layers"])
        for key, entry in self.tensors.items():
            parts = key.split(".")
            if parts[0] == "layers" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(out):
                out[int(parts[1])] += entry.nbytes
        return out


def _bad(name: str, why: str) -> KvcliError:
    return KvcliError(f"{name}: not a usable kvcli context file ({why})")


# ---- writing ------------------------------------------------------------------------------------
def canonical(header: dict[str, Any]) -> bytes:
    """kvcli's header without its checksum, as the checksum reads it (sorted keys, compact)."""
    body = {k: v for k, v in header.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def checksum(header: dict[str, Any], tensors: dict[str, TensorEntry], data: bytes | memoryview) -> str:
    """sha256 over kvcli's header (``canonical``) and every tensor, in name order: its name,
    dtype, shape and bytes (``data`` is the file's data section)."""
    digest = hashlib.sha256(canonical(header))
    view = memoryview(data)
    for key in sorted(tensors):
        entry = tensors[key]
        digest.update(json.dumps([key, entry.dtype, list(entry.shape), entry.nbytes]).encode())
        digest.update(view[entry.start : entry.end])
    return "sha256:" + digest.hexdigest()


def sign(blob: bytes, header: dict[str, Any]) -> dict[str, Any]:
    """``header`` with the checksum of the safetensors bytes ``blob`` (the tensors a writer
    serialized, with any metadata: only their table and data are read)."""
    _, tensors, start = _table(blob, "<new context>")
    return {**header, "checksum": checksum(header, tensors, memoryview(blob)[start:])}


# ---- reading ------------------------------------------------------------------------------------
def _table(data: bytes, name: str) -> tuple[dict[str, Any], dict[str, TensorEntry], int]:
    """``(raw safetensors header, tensor table, data start)`` of a file's bytes, checked: every
    tensor's bytes lie inside the data section, sized by its dtype and shape, and the data
    section ends where the last tensor does (a shorter file was truncated)."""
    if len(data) < 8:
        raise _bad(name, "truncated: shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise _bad(name, "truncated, or not a safetensors file")
    try:
        raw = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad(name, "its header is not valid JSON: corrupted or not a safetensors file") from None
    if not isinstance(raw, dict):
        raise _bad(name, "its header is not a JSON object")
    start = 8 + n
    size = len(data) - start
    tensors: dict[str, TensorEntry] = {}
    end_max = 0
    for key, spec in raw.items():
        if key == "__metadata__":
            continue
        tensors[key] = entry = _entry(key, spec, name)
        if entry.end > size:
            raise _bad(name, f"truncated: tensor {key} ends past the end of the file")
        end_max = max(end_max, entry.end)
    if end_max != size:
        raise _bad(name, f"{size - end_max} bytes after the last tensor: corrupted")
    spans = sorted((e.start, e.end) for e in tensors.values() if e.nbytes)
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)):
        raise _bad(name, "tensors overlap in the file: corrupted")
    return raw, tensors, start


def _entry(key: str, spec: Any, name: str) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _bad(name, f"tensor {key!r} has no description")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(name, f"tensor {key!r} has dtype {dtype!r}, which kvcli does not read")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(name, f"tensor {key!r} has no valid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise _bad(name, f"tensor {key!r} has no valid data offsets")
    start, end = offsets
    if end < start or end - start != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _bad(name, f"tensor {key!r}: its size does not match its shape")
    return TensorEntry(dtype=dtype, shape=tuple(shape), start=start, end=end)


def _kvcli_header(raw: dict[str, Any], name: str) -> dict[str, Any]:
    meta = raw.get("__metadata__")
    if not isinstance(meta, dict) or not isinstance(meta.get(METADATA_KEY), str):
        raise _bad(name, "a safetensors file without kvcli's header")
    try:
        header = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError):
        raise _bad(name, "kvcli's header is not valid JSON: corrupted") from None
    if not isinstance(header, dict):
        raise _bad(name, "kvcli's header is not a JSON object")
    if header.get("format") != FORMAT:
        raise _bad(name, f"its header says format {header.get('format')!r}, not {FORMAT!r}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise KvcliError(
            f"{name}: kvcli context format version {version!r}; this kvcli reads version {FORMAT_VERSION} "
            f"(compress the document again with this kvcli)"
        )
    for key, kinds in HEADER_FIELDS.items():
        if key not in header:
            raise _bad(name, f"header field {key!r} is missing")
        value = header[key]
        ok = any(value is None if k is None else isinstance(value, k) for k in kinds)
        if not ok or (isinstance(value, bool) and bool not in kinds):
            raise _bad(name, f"header field {key!r} has the wrong type")
    _check_parts(header, name)
    return header


def _check_parts(header: dict[str, Any], name: str) -> None:
    """The nested fields other code reads, typed (their meaning is checked against a model later)."""
    model = header["model"]
    if not all(isinstance(model.get(k), str) for k in MODEL_FIELDS):
        raise _bad(name, f"header field 'model' must hold the strings {', '.join(MODEL_FIELDS)}")
    for src in header["sources"]:
        if not isinstance(src, dict) or not all(
            isinstance(src.get(k), t) and not isinstance(src.get(k), bool) for k, t in SOURCE_FIELDS.items()
        ):
            raise _bad(name, "header field 'sources' must list {name, sha256, tokens}")
    if not header["sources"]:
        raise _bad(name, "header field 'sources' is empty")
    for layer in header["layers"]:
        if not isinstance(layer, dict) or not isinstance(layer.get("kind"), str):
            raise _bad(name, "header field 'layers' must list {kind, ...} per layer")
    for key in ("context_tokens", "chunk_size", "kv_bytes", "kv_bytes_full", "truncated_tokens"):
        if header[key] < 0:
            raise _bad(name, f"header field {key!r} is negative")


def parse(data: bytes, name: str) -> SavedFile:
    """A ``.kvc`` file's bytes, checked: container, kvcli's header and the checksum."""
    raw, tensors, start = _table(data, name)
    header = _kvcli_header(raw, name)
    if checksum(header, tensors, memoryview(data)[start:]) != header["checksum"]:
        raise _bad(name, "checksum mismatch: the file is corrupted")
    return SavedFile(name=name, header=header, tensors=tensors, data_start=start, size=len(data))


def read(path: str | os.PathLike) -> tuple[SavedFile, bytes]:
    """Read and check a ``.kvc`` file: ``(its description, its bytes)``."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KvcliError(f"{name}: no such file") from None
    except OSError as exc:
        raise KvcliError(f"{name}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KvcliError(f"{name}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        raise KvcliError(f"{name}: cannot read the file ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    return parse(data, name), data


def looks_saved(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a saved context rather than a document: the ``.kvc`` suffix, or
    a safetensors header that carries kvcli's format name (read from the first bytes only)."""
    if str(path) == "-":
        return False
    p = Path(path)
    if p.suffix.lower() == SUFFIX:
        return True
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            if not 2 <= n <= MAX_HEADER_BYTES:
                return False
            text = fh.read(min(n, 1 << 20))
    except OSError:
        return False
    return text[:1] == b"{" and FORMAT.encode() in text
