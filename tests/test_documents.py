"""Tests for kvcli.documents: every supported input kind and every user-facing error."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from kvcli.core.documents import Document, load_document, normalize
from kvcli.core.errors import KvcliError

from conftest import make_pdf


def load_error(path, stdin=None) -> str:
    """Load and return the KvcliError message, checking it is a single line."""
    with pytest.raises(KvcliError) as info:
        load_document(path, stdin=stdin)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8", newline="")
    else:
        path.write_bytes(data)
    return path


# --- text and markdown -------------------------------------------------------


def test_txt_utf8_is_normalised(tmp_path):
    path = write(tmp_path, "a.txt", "Grüße, naïve café\r\nsecond\tline\x07 here\x1b\r\n\r\n  \n")
    doc = load_document(path)
    assert isinstance(doc, Document)
    assert doc.kind == "text"
    assert doc.source == str(path)
    assert doc.text == "Grüße, naïve café\nsecond\tline here"


def test_txt_utf8_bom_is_stripped(tmp_path):
    path = write(tmp_path, "bom.txt", "\ufeffHello BOM".encode("utf-8"))
    assert load_document(path).text == "Hello BOM"


def test_latin1_falls_back_to_legacy_encoding(tmp_path):
    text = "Le café est très bon, merci beaucoup. Ça va très bien à Paris, l'été."
    path = write(tmp_path, "fr.txt", text.encode("latin-1"))
    assert load_document(path).text == text


def test_utf16_with_bom(tmp_path):
    path = write(tmp_path, "wide.txt", "héllo wörld\r\n".encode("utf-16"))
    assert load_document(path).text == "héllo wörld"


@pytest.mark.parametrize("name", ["notes.md", "notes.markdown"])
def test_markdown(tmp_path, name):
    path = write(tmp_path, name, "# Title\n\n* item one\n* item two\n")
    doc = load_document(path)
    assert doc.kind == "markdown"
    assert doc.text == "# Title\n\n* item one\n* item two"


def test_rst_and_unknown_text_extension(tmp_path):
    assert load_document(write(tmp_path, "r.rst", "Heading\n=======\n")).kind == "text"
    doc = load_document(write(tmp_path, "server.log", "plain log line\n"))
    assert (doc.kind, doc.text) == ("text", "plain log line")


# --- html --------------------------------------------------------------------

HTML = """<!DOCTYPE html>
<html><head><title>Page title</title><meta charset="utf-8">
<style>body { color: red; }</style>
<script>var secret = "SCRIPT-CONTENT";</script></head>
<body>
  <noscript>Enable JavaScript</noscript>
  <!-- a hidden comment -->
  <h1>Main   heading</h1>
  <p>First   paragraph
     spans lines with <b>bold</b> text.</p>
  <p>Second&nbsp;paragraph.<br>After break.</p>
  <ul><li>one</li><li>two</li></ul>
  <template><p>TEMPLATE-CONTENT</p></template>
  <script>alert("SCRIPT-TWO")</script>
</body></html>
"""


def test_html_visible_text_only(tmp_path):
    doc = load_document(write(tmp_path, "page.html", HTML))
    assert doc.kind == "html"
    for hidden in (
        "SCRIPT-CONTENT",
        "SCRIPT-TWO",
        "color: red",
        "Enable JavaScript",
        "hidden comment",
        "TEMPLATE-CONTENT",
        "charset",
    ):
        assert hidden not in doc.text
    assert doc.text == (
        "Main heading\n\nFirst paragraph spans lines with bold text.\n\nSecond paragraph.\nAfter break.\n\none\ntwo"
    )


def test_htm_extension(tmp_path):
    doc = load_document(write(tmp_path, "x.htm", "<p>short</p>"))
    assert (doc.kind, doc.text) == ("html", "short")


def test_html_with_only_script_is_empty(tmp_path):
    path = write(tmp_path, "s.html", "<html><script>x=1</script><style>p{}</style></html>")
    assert load_error(path) == f"{path}: document is empty"


# --- pdf ---------------------------------------------------------------------


def test_pdf_pages_joined_with_blank_line(tmp_path):
    path = write(tmp_path, "doc.pdf", make_pdf(["Hello page one", "Second page"]))
    doc = load_document(path)
    assert doc.kind == "pdf"
    assert doc.text == "Hello page one\n\nSecond page"


def test_pdf_encrypted_with_empty_user_password_is_readable(tmp_path):
    path = write(tmp_path, "open.pdf", make_pdf(["Readable anyway"], password=""))
    assert load_document(path).text == "Readable anyway"


def test_pdf_encrypted(tmp_path):
    path = write(tmp_path, "locked.pdf", make_pdf(["Top secret"], password="secret"))
    message = load_error(path)
    assert message.startswith(f"{path}: PDF is encrypted")
    assert "Top secret" not in message


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_pdf_corrupt(tmp_path, damage):
    good = make_pdf(["Hello"])
    bad = good[: len(good) // 2] if damage == "truncate" else b"%PDF-1.7\n" + b"\x13garbage" * 200
    path = write(tmp_path, "bad.pdf", bad)
    message = load_error(path)
    assert message.startswith(f"{path}: cannot read PDF (")
    assert message.endswith(")")


def test_pdf_without_text(tmp_path):
    path = write(tmp_path, "scan.pdf", make_pdf(["", ""]))
    message = load_error(path)
    assert message.startswith(f"{path}: PDF has no extractable text")
    assert "OCR is not supported" in message


# --- stdin -------------------------------------------------------------------


def test_stdin_text_via_buffer():
    stream = io.TextIOWrapper(io.BytesIO(b"from stdin\r\nline 2\n"), encoding="utf-8")
    doc = load_document("-", stdin=stream)
    assert (doc.source, doc.kind, doc.text) == ("stdin", "text", "from stdin\nline 2")


def test_stdin_plain_string_stream():
    assert load_document("-", stdin=io.StringIO("just a string")).text == "just a string"


def test_stdin_pdf_is_sniffed():
    stream = io.TextIOWrapper(io.BytesIO(make_pdf(["Piped PDF"])), encoding="utf-8")
    doc = load_document("-", stdin=stream)
    assert (doc.kind, doc.text) == ("pdf", "Piped PDF")


def test_stdin_html_is_sniffed():
    page = b"<!DOCTYPE HTML><html><body><p>Hi <script>no</script>there</p></body></html>"
    doc = load_document("-", stdin=io.BytesIO(page))
    assert (doc.kind, doc.text) == ("html", "Hi there")


def test_stdin_reads_sys_stdin_by_default(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"default stdin"), encoding="utf-8"))
    assert load_document("-").text == "default stdin"


def test_stdin_errors_name_stdin():
    assert load_error("-", stdin=io.BytesIO(b" \n\t ")) == "stdin: document is empty"
    assert load_error("-", stdin=io.BytesIO(b"abc\x00\x01\x02" * 50)).startswith("stdin: looks like a binary file")


# --- file-system and content errors -------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    assert load_error(path) == f"{path}: no such file"


def test_directory(tmp_path):
    assert load_error(tmp_path) == f"{tmp_path}: is a directory, not a document"


def test_unreadable_file(tmp_path, monkeypatch):
    path = write(tmp_path, "secret.txt", "hidden")

    real_open = os.open

    def deny(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)  # tests may run as root, where chmod 000 does not deny
    message = load_error(path)
    assert message.startswith(f"{path}: permission denied")


def test_empty_file(tmp_path):
    path = write(tmp_path, "empty.txt", b"")
    assert load_error(path) == f"{path}: document is empty"


def test_whitespace_only_file(tmp_path):
    path = write(tmp_path, "blank.md", " \r\n\t\n   \n")
    assert load_error(path) == f"{path}: document is empty"


def test_normalize_drops_controls_keeps_tabs_and_newlines():
    assert normalize("\ufeffa\x00b\rc\r\nd\te\x85f\x7f \n\n") == "ab\nc\nd\tef"


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 8,  # NUL bytes: classic binary
        bytes(range(1, 32)) * 100,  # valid UTF-8 but nearly all control characters
        bytes((i * 97 + 13) % 128 + 128 for i in range(4000)),  # high bytes, no plausible decoding
    ],
    ids=["nul", "controls", "undecodable"],
)
def test_binary_junk(tmp_path, data):
    path = write(tmp_path, "junk.txt", data)
    assert load_error(path) == f"{path}: looks like a binary file, not a text document"


def test_binary_with_unknown_extension(tmp_path):
    path = write(tmp_path, "image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    assert load_error(path) == f"{path}: looks like a binary file, not a text document"


def test_html_pre_keeps_layout_and_tables_get_rows(tmp_path):
    markup = (
        "<div><div><p>Intro</p></div></div>"
        "<pre>def f():\n    return 1</pre>"
        "<table><tr><th>a</th> <th>b</th></tr><tr><td>c</td><td>d</td></tr></table>"
    )
    doc = load_document(write(tmp_path, "code.html", markup))
    assert doc.text == "Intro\n\ndef f():\n    return 1\n\na b\nc d"
