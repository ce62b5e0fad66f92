"""A model's fingerprint: hashes of its configuration, tokenizer and weights.

A saved context (``.kvc``) holds keys and values that only the model that computed them can
read, so it records this fingerprint and a load compares it.  It must be cheap, since every
load pays it once per model (then it is remembered): the configuration and the vocabulary
are hashed whole; the weights are hashed by name, shape, dtype and up to
``WEIGHT_SAMPLES`` evenly spaced values of every parameter (reading a 1 GB model in full
would take longer than reloading a context).  Two checkpoints that differ only between
the sampled values would pass; any retraining, fine-tuning or re-initialisation changes
the sampled values.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import torch

WEIGHT_SAMPLES = 4096
#: Configuration keys that say how a model was loaded, not what it is.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "attn_implementation", "use_cache"}

_known: weakref.WeakKeyDictionary[Any, dict[str, str]] = weakref.WeakKeyDictionary()


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items() if str(k) not in _VOLATILE and not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def config_hash(config: Any) -> str:
    data = _clean(config.to_dict())
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """The vocabulary and special tokens (what maps text to the ids the cache was built from)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    vocab = getattr(tokenizer, "get_vocab", None)
    if callable(vocab):
        digest.update(json.dumps(sorted(vocab().items()), ensure_ascii=True).encode())
    else:  # a stand-in without a vocabulary (tests): how it encodes a probe text
        digest.update(
            json.dumps(tokenizer.encode("kvcli fingerprint 0123456789 ÄÖÜ", add_special_tokens=False)).encode()
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        digest.update(f"{name}={getattr(tokenizer, name, None)};".encode())
    return digest.hexdigest()


@torch.no_grad()
def weights_hash(model: Any) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = p.detach().reshape(-1)
        digest.update(f"{name}:{list(p.shape)}:{p.dtype};".encode())
        if flat.numel():
            idx = torch.linspace(0, flat.numel() - 1, min(flat.numel(), WEIGHT_SAMPLES), dtype=torch.float64)
            idx = idx.round().long().to(flat.device)
            digest.update(flat[idx].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: Any, tokenizer: Any) -> dict[str, str]:
    """``{config_sha256, tokenizer_sha256, weights_sha256}`` (computed once per model object)."""
    known = _known.get(model)
    if known is None or known.get("_tokenizer") != str(id(tokenizer)):
        known = {
            "config_sha256": config_hash(model.config),
            "tokenizer_sha256": tokenizer_hash(tokenizer),
            "weights_sha256": weights_hash(model),
            "_tokenizer": str(id(tokenizer)),
        }
        _known[model] = known
    return {k: v for k, v in known.items() if not k.startswith("_")}
