"""Property tests for the document loader (hypothesis): whatever the bytes, extension,
encoding or truncation, ``load_document`` returns clean text or raises a ``KvcliError``
with a one-line message naming the source; never another exception."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcli.core.documents import _CONTROL_RE, Document, load_document, normalize
from kvcli.core.errors import KvcliError

from conftest import make_pdf

EXTENSIONS = ["", ".txt", ".md", ".rst", ".html", ".htm", ".pdf", ".bin"]
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "cp1252"]
PDFS = [make_pdf(["A short page of text about a harbour."]), make_pdf(["One", "Two pages"], password="pw")]

#: Text a person could write: letters of several scripts, digits, punctuation, whitespace.
READABLE = st.text(
    alphabet=st.characters(categories=["L", "N", "P", "Zs"], include_characters="\n\t"), min_size=1, max_size=300
)


@st.composite
def raw_documents(draw) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["bytes", "text", "pdf", "html"]))
    if kind == "bytes":
        data = draw(st.binary(max_size=2048))
    elif kind == "text":
        data = draw(st.text(max_size=400)).encode(draw(st.sampled_from(ENCODINGS)), errors="replace")
    elif kind == "html":
        body = draw(st.text(max_size=200))
        data = f"<html><body><p>{body}</p><script>x()</script></body></html>".encode()
    else:
        data = draw(st.sampled_from(PDFS))
    if draw(st.booleans()):  # a file cut short (a download interrupted, a disk full)
        data = data[: draw(st.integers(0, len(data)))]
    return data, draw(st.sampled_from(EXTENSIONS))


def _check(load, name: str) -> None:
    try:
        doc = load()
    except KvcliError as exc:
        message = str(exc)
        assert message and "\n" not in message and message.startswith(f"{name}:"), message
        return
    assert isinstance(doc, Document)
    assert doc.text.strip() and doc.text == doc.text.rstrip()
    assert not _CONTROL_RE.search(doc.text) and "\r" not in doc.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_documents())
def test_any_file_loads_or_fails_in_one_line(case):
    data, ext = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"doc{ext}"
        path.write_bytes(data)
        _check(lambda: load_document(path), str(path))


@settings(max_examples=75, deadline=None)
@given(raw_documents())
def test_any_stdin_loads_or_fails_in_one_line(case):
    data, _ = case
    _check(lambda: load_document("-", stdin=io.BytesIO(data)), "stdin")


@settings(max_examples=100, deadline=None)
@given(READABLE, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))
def test_readable_text_round_trips(text, encoding):
    """Text in UTF-8, or UTF-16/32 with a byte-order mark, loads exactly (normalised)."""
    expected = normalize(text)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.txt"
        path.write_bytes(text.encode(encoding))
        if not expected.strip():
            _check(lambda: load_document(path), str(path))
            return
        assert load_document(path).text == expected


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "Zs"]), min_size=40, max_size=300),
    st.sampled_from(["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"]),
)
def test_wide_text_without_bom_round_trips(text, encoding):
    """Mostly-ASCII text in UTF-16/32 without a byte-order mark is recognised, not called binary."""
    expected = normalize(text)
    if not expected.strip():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "doc.txt"
        path.write_bytes(text.encode(encoding))
        assert load_document(path).text == expected
