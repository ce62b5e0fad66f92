"""A model's fingerprint: hashes of its configuration, tokenizer and weights.

A saved context (``.kvc``) holds keys and values that only the model that computed them can
read, so it records this fingerprint and a load compares it.  It must be cheap, since every
load pays it once per model (then it is remembered): the configuration and the vocabulary
are hashed whole; the weights are hashed by name, shape, dtype and the bits of up to
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

import numpy as np
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
    if callable(vocab):  # tokens in id order (a JSON dump of 262K pairs took seconds)
        pairs = sorted(vocab().items(), key=lambda item: item[1])
        digest.update("\x00".join(f"{i}\x01{t}" for t, i in pairs).encode("utf-8", "surrogatepass"))
    else:  # a stand-in without a vocabulary (tests): how it encodes a probe text
        probe = tokenizer.encode("kvcli fingerprint 0123456789 ÄÖÜ", add_special_tokens=False)
        digest.update(json.dumps(probe).encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        digest.update(f"{name}={getattr(tokenizer, name, None)};".encode())
    return digest.hexdigest()


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _sample(p: torch.Tensor) -> bytes:
    """The raw bits of up to ``WEIGHT_SAMPLES`` evenly spaced elements of ``p``, read in place
    (on the CPU through numpy: a few hundred small torch ops cost seconds on a busy machine)."""
    n = p.numel()
    idx = np.linspace(0, n - 1, min(n, WEIGHT_SAMPLES)).round().astype(np.int64)
    bits = p.detach().view(_BITS[p.element_size()])
    if bits.dim() == 0:
        return bits.cpu().numpy().tobytes()
    if bits.device.type == "cpu":
        arr = bits.numpy()
        return np.ascontiguousarray(arr[np.unravel_index(idx, arr.shape)]).tobytes()
    where = torch.unravel_index(torch.from_numpy(idx).to(bits.device), tuple(bits.shape))
    return bits[where].cpu().numpy().tobytes()


@torch.no_grad()
def weights_hash(model: Any) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(f"{name}:{list(p.shape)}:{p.dtype};".encode())
        if p.numel():
            digest.update(_sample(p))
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
