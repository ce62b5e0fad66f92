"""Load a document (text, Markdown, PDF, HTML, or stdin) as clean plain text.

Everything the model sees goes through here, so this module owns two promises:
the text is normalised (no CR, no control junk) and every failure is a
one-line KvcliError that names the file and says what is wrong.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import charset_normalizer

from .errors import KvcliError

TEXT_EXTENSIONS = {".txt": "text", ".rst": "text", ".md": "markdown", ".markdown": "markdown"}
HTML_EXTENSIONS = {".html", ".htm"}

_SNIFF_BYTES = 8192  # enough to judge "binary or not" without scanning huge files
_MAX_CONTROL_RATIO = 0.10  # leaves room for e.g. ANSI-coloured logs

# Control characters other than \n and \t (C0, DEL, C1); \r is handled before this runs.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Tags whose contents are never visible text.
_INVISIBLE_TAGS = (
    "script",
    "style",
    "noscript",
    "template",
    "head",
    "meta",
    "link",
    "svg",
    "iframe",
    "object",
    "embed",
)
# Block tags that start a new paragraph vs. ones that only start a new line.
_PARAGRAPH_TAGS = (
    "p",
    "div",
    "section",
    "article",
    "main",
    "header",
    "footer",
    "nav",
    "aside",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "pre",
    "ul",
    "ol",
    "dl",
    "table",
    "figure",
    "form",
    "fieldset",
    "address",
    "hr",
    "details",
    "body",
)
_LINE_TAGS = ("li", "tr", "dt", "dd", "caption", "figcaption", "summary", "option", "legend")
_LINE_MARK, _PARAGRAPH_MARK, _CELL_MARK = "\ue000", "\ue001", "\ue002"
_BREAKS_RE = re.compile(r"[ \ue000-\ue002]*[\ue000\ue001][ \ue000-\ue002]*")
_CELLS_RE = re.compile(r" *\ue002[ \ue002]*")


@dataclass
class Document:
    """A loaded document: normalised text plus where it came from and what it was."""

    text: str
    source: str  # the path as given, or "stdin"
    kind: str  # "text", "markdown", "pdf" or "html"


def load_document(path: str | os.PathLike, stdin: typing.TextIO | typing.BinaryIO | None = None) -> Document:
    """Read `path` (or stdin for "-") and return its visible text.

    Raises KvcliError with a one-line, path-prefixed message for anything the
    user can fix: missing file, directory, binary junk, encrypted or corrupt
    PDF, scanned PDF without text, or an empty document.
    """
    if str(path) == "-":
        name = "stdin"
        data = _read_stream(stdin if stdin is not None else sys.stdin)
        kind = _sniff(data)
    else:
        name = str(path)
        data = _read_file(Path(path), name)
        suffix = Path(path).suffix.lower()
        if suffix == ".pdf":
            kind = "pdf"
        elif suffix in HTML_EXTENSIONS:
            kind = "html"
        elif suffix in TEXT_EXTENSIONS:
            kind = TEXT_EXTENSIONS[suffix]
        else:
            kind = _sniff(data)  # unknown extension: trust the content

    if not data.strip():
        raise KvcliError(f"{name}: document is empty")

    if kind == "pdf":
        text = _pdf_text(data, name)
    elif kind == "html":
        text = _html_text(_decode(data, name))
    else:
        text = _decode(data, name)

    text = normalize(text)
    if not text.strip():
        raise KvcliError(f"{name}: document is empty")
    return Document(text=text, source=name, kind=kind)


def normalize(text: str) -> str:
    """Unify line endings and drop control characters so downstream code sees plain lines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_RE.sub("", text).rstrip()


def _read_file(path: Path, name: str) -> bytes:
    """Read raw bytes, turning OS errors into one-line messages."""
    try:
        if path.is_dir():
            raise KvcliError(f"{name}: is a directory, not a document")
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise KvcliError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise KvcliError(f"{name}: is a directory, not a document") from None
    except PermissionError:
        raise KvcliError(f"{name}: permission denied, cannot read the file") from None
    except OSError as exc:
        raise KvcliError(f"{name}: cannot read the file ({_one_line(exc.strerror or exc)})") from None


def _read_stream(stream: typing.TextIO | typing.BinaryIO) -> bytes:
    """Read all of a stream, preferring the byte layer so PDFs survive intact."""
    raw = getattr(stream, "buffer", stream).read()
    if isinstance(raw, str):
        return raw.encode("utf-8", errors="replace")
    return bytes(raw)


def _sniff(data: bytes) -> str:
    """Guess the kind of content that arrived without a trustworthy extension."""
    head = data[:1024].lstrip()
    if head.startswith(b"%PDF-"):
        return "pdf"
    lowered = head.lower()
    if b"<html" in lowered or b"<!doctype html" in lowered:
        return "html"
    return "text"


def _decode(data: bytes, name: str) -> str:
    """Decode bytes as text (UTF-8 first, then a guessed legacy encoding), rejecting binary files."""
    binary = KvcliError(f"{name}: looks like a binary file, not a text document")
    text: str | None = None
    # UTF-16/32 legitimately contain NUL bytes, so honour their BOMs before the NUL check.
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                raise binary from None
            break
    if text is None:
        if b"\x00" in data[:_SNIFF_BYTES]:
            raise binary
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = _guess_decode(data)
            if text is None:
                raise binary from None
    sample = text[:_SNIFF_BYTES]
    controls = sum(1 for ch in sample if ch not in "\n\r\t\f" and (ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F))
    if sample and controls / len(sample) > _MAX_CONTROL_RATIO:
        raise binary
    return text


def _guess_decode(data: bytes) -> str | None:
    """Ask charset-normalizer for the best decoding; None when nothing is plausible.

    On ties we prefer cp1252: it is by far the most common legacy encoding and
    charset-normalizer otherwise often picks cp1250 for Western text (è -> č).
    """
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        return None
    for match in matches:
        if match.encoding == "cp1252" and match.chaos <= best.chaos and match.coherence >= best.coherence:
            best = match
            break
    return str(best)


def _pdf_text(data: bytes, name: str) -> str:
    """Extract text from all pages; encrypted, corrupt and scanned PDFs get distinct messages."""
    from pypdf import PdfReader  # optional-weight: only PDFs need it

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its repair warnings would clutter the CLI
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                unlocked = bool(reader.decrypt(""))
            except Exception:
                unlocked = False
            if not unlocked:
                raise KvcliError(
                    f"{name}: PDF is encrypted and needs a password; decrypt it first (e.g. qpdf --decrypt)"
                )
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except KvcliError:
        raise
    except Exception as exc:  # pypdf raises many unrelated types for damaged files
        raise KvcliError(f"{name}: cannot read PDF ({_one_line(exc)})") from None
    if not pages:
        raise KvcliError(f"{name}: cannot read PDF (it has no pages)")
    text = "\n\n".join(page for page in pages if page)
    if not text.strip():
        raise KvcliError(f"{name}: PDF has no extractable text (scanned images?); OCR is not supported")
    return text


def _html_text(markup: str) -> str:
    """Return the visible text of an HTML page, one block per line, paragraphs separated by blank lines."""
    from bs4 import BeautifulSoup, Comment, Declaration, Doctype, ProcessingInstruction

    soup = BeautifulSoup(markup, "html.parser")
    hidden_strings = (Comment, Declaration, Doctype, ProcessingInstruction)
    for node in soup.find_all(string=lambda s: isinstance(s, hidden_strings)):
        node.extract()
    for tag in soup.find_all(_INVISIBLE_TAGS):
        tag.decompose()
    # Source whitespace is insignificant in HTML (except in <pre>): collapse it before
    # inserting our own newlines, so only real structure produces line breaks.
    for string in soup.find_all(string=True):
        if string.find_parent("pre") is None:
            string.replace_with(re.sub(r"\s+", " ", str(string)))
    # Mark breaks with private-use characters, then resolve each run of marks at once:
    # adjacent blocks then give one break, not a pile of blank lines.
    for br in soup.find_all("br"):
        br.replace_with(_LINE_MARK)
    for tag in soup.find_all(_LINE_TAGS):
        tag.insert_before(_LINE_MARK)
        tag.insert_after(_LINE_MARK)
    for tag in soup.find_all(_PARAGRAPH_TAGS):
        tag.insert_before(_PARAGRAPH_MARK)
        tag.insert_after(_PARAGRAPH_MARK)
    for tag in soup.find_all(("td", "th")):
        tag.insert_after(_CELL_MARK)
    text = _BREAKS_RE.sub(lambda m: "\n\n" if _PARAGRAPH_MARK in m.group() else "\n", soup.get_text())
    return _CELLS_RE.sub(" ", text).strip()


def _one_line(exc: object) -> str:
    """A short single-line reason for an exception, for embedding in a message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
