"""The ``.kvc`` reader under hostile input (hypothesis): files cut anywhere, bytes flipped
anywhere, headers forged and signed again.  Every case is a ``KvcliError`` (one line, never
a traceback), or a context identical to the one saved: never garbage loaded silently."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcli import api
from kvcli.api.reloading import context_from
from kvcli.cache.serialize import cache_state
from kvcli.core import kvcfile
from kvcli.core.errors import KvcliError

from conftest import IdTokenizer, sharpen, tiny_llama

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A kvmerger context (positions, merge counts, statistics) on a tiny Llama, saved: its bytes."""
    lm = api.wrap_model(sharpen(tiny_llama(num_kv_heads=2, layers=2)), IdTokenizer())
    ids = torch.randint(3, 128, (48,), generator=torch.Generator().manual_seed(0))
    ctx = api.prefill(lm, ids, method="kvmerger", budget="0.5", chunk_size=16, raw=True, scoring="window")
    path = tmp_path_factory.mktemp("kvc") / "doc.kvc"
    ctx.save(path)
    return lm, path.read_bytes(), cache_state(ctx.engine.cache)[0]


def load(lm, data: bytes):
    """What ``api.load_context`` does once it has read the file's bytes."""
    return context_from(lm, kvcfile.parse(data, "fuzz.kvc"), data)


def assert_same_as_saved(ctx, tensors) -> None:
    got = cache_state(ctx.engine.cache)[0]
    assert set(got) == set(tensors)
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def assert_one_line(exc: KvcliError) -> None:
    assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncated_anywhere(saved, cut):
    lm, data, _ = saved
    cut %= len(data)
    with pytest.raises(KvcliError) as info:
        load(lm, data[:cut])
    assert_one_line(info.value)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_flipped_bytes(saved, flips):
    lm, data, tensors = saved
    bad = bytearray(data)
    for where, mask in flips:
        bad[where % len(data)] ^= mask
    try:
        ctx = load(lm, bytes(bad))
    except KvcliError as exc:
        assert_one_line(exc)
    else:  # only a flip that changes nothing kvcli reads (JSON whitespace) may load
        assert_same_as_saved(ctx, tensors)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def forge(data: bytes, change) -> bytes:
    """The file with kvcli's header changed by ``change`` and signed again (the forger knows the format)."""
    n = int.from_bytes(data[:8], "little")
    raw = json.loads(data[8 : 8 + n])
    header = json.loads(raw["__metadata__"]["kvcli"])
    change(header)
    _, tensors, start = kvcfile._table(data, "x")
    header["checksum"] = kvcfile.checksum(header, tensors, memoryview(data)[start:])
    raw["__metadata__"]["kvcli"] = json.dumps(header)
    text = json.dumps(raw).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


@FUZZ
@given(field=st.sampled_from(sorted(kvcfile.HEADER_FIELDS)), key=st.text(max_size=12), value=JSON, drop=st.booleans())
def test_forged_headers(saved, field, key, value, drop):
    """A field (or one entry inside it) replaced by any JSON value, or removed."""
    lm, data, _ = saved

    def change(header):
        target = header[field]
        if isinstance(target, dict) and target:
            inner = sorted(target)[len(key) % len(target)]
            target.pop(inner) if drop else target.__setitem__(inner, value)
        elif isinstance(target, list) and target:
            i = len(key) % len(target)
            if drop:
                target.pop(i)
            elif isinstance(target[i], dict) and target[i]:
                target[i][sorted(target[i])[len(key) % len(target[i])]] = value
            else:
                target[i] = value
        elif drop:
            header.pop(field)
        else:
            header[field] = value

    try:
        ctx = load(lm, forge(data, change))
    except KvcliError as exc:
        assert_one_line(exc)
    else:  # a forged header kvcli accepts still gives a context that answers
        ctx._eos = lambda: set()
        assert len(ctx.generate_ids([5, 6], 2)) == 2


@FUZZ
@given(
    header=st.dictionaries(st.sampled_from(sorted(kvcfile.HEADER_FIELDS)), JSON, max_size=len(kvcfile.HEADER_FIELDS))
)
def test_headers_made_up_whole(saved, header):
    lm, data, _ = saved
    made = {"format": kvcfile.FORMAT, "format_version": kvcfile.FORMAT_VERSION, **header}
    with pytest.raises(KvcliError) as info:
        load(lm, forge(data, lambda h: (h.clear(), h.update(made))))
    assert_one_line(info.value)
