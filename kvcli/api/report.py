"""What a prefilled context holds and cost, measured: ``Context.report()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PrefillReport:
    """Figures of one prefill, bytes counted from the cache tensors right after it.

    ``as_dict()`` is the object ``--json`` prints (after ``answers`` / ``summary``): these
    field names are its keys, in this order."""

    model: str
    method: str
    method_options: dict
    budget: str
    scoring: str | None  # where scored methods' statistics came from (None: the method scores nothing)
    context_tokens: int
    truncated_tokens: int
    kv_bytes: int  # what the cache tensors hold after prefill
    kv_bytes_full: int  # what the uncompressed cache would hold
    kv_ratio: float
    compressed_layers: list[int]
    kv_bytes_per_layer: list[int]  # per compressed layer
    kv_bytes_all_layers: list[int]
    kept_tokens: list[int]  # per compressed layer
    peak_rss_bytes: int
    peak_prefill_kv_bytes: int  # largest cache at a chunk boundary, before compression
    peak_scoring_kv_bytes: int  # largest cache during a scoring pass (0: none ran); transient
    prefill_seconds: float
    prefill_tokens_per_second: float
    compress_seconds: float
    scoring_seconds: float  # scoring passes after chunks (reconstruction, questions), part of prefill_seconds
    decode_seconds: float
    chunk_size: int
    adapter: str = "none"  # PoD: the adapter file applied to the member layers (kvcli adapt), or none

    def as_dict(self) -> dict:
        return asdict(self)
