"""Load a document (text, Markdown, PDF, HTML, or stdin) as clean plain text.

Everything the model sees goes through here, so this module owns two promises:
the text is normalised (no CR, no control junk) and every failure is a
one-line KvcliError that names the file and says what is wrong.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import logging
import os
import re
import stat
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import charset_normalizer

from .errors import KvcliError

TEXT_EXTENSIONS = {".txt": "text", ".rst": "text", ".md": "markdown", ".markdown": "markdown"}
HTML_EXTENSIONS = {".html", ".htm"}

_SNIFF_BYTES = 8192  # enough to judge "binary or not" without scanning huge files

#: Largest document kvcli reads, in raw bytes (file or stdin); ``KVCLI_MAX_DOCUMENT_BYTES``
#: changes it.  64 MiB of text is ~16M tokens, far past any model's positions, so a bigger
#: input is almost surely a mistake (``/dev/zero``, a disk image) that would fill memory.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_BYTES_ENV = "KVCLI_MAX_DOCUMENT_BYTES"
_READ_BLOCK = 1 << 20
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
    sha256: str = ""  # of the raw bytes read (file or stdin): a saved context names its source by it


def load_document(path: str | os.PathLike, stdin: typing.TextIO | typing.BinaryIO | None = None) -> Document:
    """Read `path` (or stdin for "-") and return its visible text.

    Raises KvcliError with a one-line, path-prefixed message for anything the
    user can fix: missing file, directory, binary junk, encrypted or corrupt
    PDF, scanned PDF without text, or an empty document.
    """
    limit = max_document_bytes()
    if str(path) == "-":
        return parse_document(_read_stream(stdin if stdin is not None else sys.stdin, limit), "stdin", by_content=True)
    return parse_document(read_document_bytes(path), str(path))


def read_document_bytes(path: str | os.PathLike) -> bytes:
    """A document file's raw bytes, read as ``load_document`` reads them (a regular file,
    at most ``max_document_bytes()``); failures are one-line ``KvcliError``s naming it."""
    return _read_file(Path(path), str(path), max_document_bytes())


def parse_document(data: bytes, name: str, by_content: bool = False) -> Document:
    """A document from its raw bytes (``kvcli batch`` sends bytes to workers that may not see
    the file).  ``name``: the path, for messages and the kind (by its extension, as
    ``load_document`` does); ``by_content``: the kind from the content alone (stdin)."""
    suffix = Path(name).suffix.lower()
    if by_content:
        kind = _sniff(data)
    elif suffix == ".pdf":
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
    return Document(text=text, source=name, kind=kind, sha256=hashlib.sha256(data).hexdigest())


def normalize(text: str) -> str:
    """Unify line endings and drop control characters so downstream code sees plain lines."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL_RE.sub("", text).rstrip()


def max_document_bytes() -> int:
    """The size cap on a document's raw bytes (``MAX_DOCUMENT_BYTES``, or ``$KVCLI_MAX_DOCUMENT_BYTES``)."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return MAX_DOCUMENT_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise KvcliError(f"environment {MAX_BYTES_ENV}={raw!r}: give a positive number of bytes")
    return value


def _size(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB" if n >= 1024**2 else f"{n:,} bytes"


def _too_big(name: str, limit: int, size: int | None = None) -> KvcliError:
    what = f"is {_size(size)}" if size is not None else "is larger than that"
    return KvcliError(
        f"{name}: documents are limited to {_size(limit)} and this one {what} (set {MAX_BYTES_ENV} to allow more)"
    )


_KINDS = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


def _read_file(path: Path, name: str, limit: int) -> bytes:
    """Read a regular file of at most ``limit`` bytes, turning OS errors into one-line messages.

    Opened without blocking and checked on the open file: a FIFO (which would wait for a
    writer forever), a device such as ``/dev/zero`` (endless) or a socket is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise KvcliError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise KvcliError(f"{name}: is a directory, not a document") from None
    except PermissionError:
        raise KvcliError(f"{name}: permission denied, cannot read the file") from None
    except OSError as exc:
        raise KvcliError(f"{name}: cannot read the file ({_one_line(exc.strerror or exc)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise KvcliError(f"{name}: is a directory, not a document")
        if not stat.S_ISREG(mode):
            what = next((label for test, label in _KINDS.items() if test(mode)), "not a regular file")
            raise KvcliError(f"{name}: is {what}, not a document file; to read a stream, pipe it to stdin: - < {name}")
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(name, limit, size)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)  # a file that grew since fstat is still capped
    except IsADirectoryError:
        raise KvcliError(f"{name}: is a directory, not a document") from None
    except OSError as exc:
        raise KvcliError(f"{name}: cannot read the file ({_one_line(exc.strerror or exc)})") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _too_big(name, limit)
    return data


def _read_stream(stream: typing.TextIO | typing.BinaryIO, limit: int) -> bytes:
    """Read a stream (stdin) up to ``limit`` bytes, preferring the byte layer so PDFs survive
    intact; more than that is an error, found after reading ``limit`` + 1 bytes at most."""
    source = getattr(stream, "buffer", stream)
    parts: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            block = source.read(min(_READ_BLOCK, limit + 1 - total))
            if not block:
                break
            if isinstance(block, str):
                block = block.encode("utf-8", errors="replace")
            parts.append(bytes(block))
            total += len(block)
    except OSError as exc:
        raise KvcliError(f"stdin: cannot read it ({_one_line(exc.strerror or exc)})") from None
    if total > limit:
        raise _too_big("stdin", limit)
    return b"".join(parts)


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
            text = _decode_wide(data, encoding, name, "with a byte-order mark")
            break
    if text is None and b"\x00" in data[:_SNIFF_BYTES]:
        wide = _wide_encoding(data[:_SNIFF_BYTES])
        if wide is None:
            raise binary
        text = _decode_wide(data, wide, name, "without a byte-order mark")
    if text is None:
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


def _wide_encoding(sample: bytes) -> str | None:
    """UTF-32 or UTF-16 (LE/BE) text without a byte-order mark, told by where its NUL bytes
    sit: in the code units' high bytes, (almost) never in their low bytes; binary data has
    them anywhere.  (A low byte is NUL only for code points such as U+0100 or U+4E00.)"""
    for width, names in ((4, ("utf-32-le", "utf-32-be")), (2, ("utf-16-le", "utf-16-be"))):
        n = len(sample) - len(sample) % width
        if n < 2 * width:
            continue
        nul = [sample[i:n:width].count(0) / (n // width) for i in range(width)]
        if width == 4:  # the top byte is always NUL, the plane byte nearly always, the low byte rarely
            ok = [
                nul[3] == 1 and nul[2] >= 0.9 and nul[0] <= 0.25,
                nul[0] == 1 and nul[1] >= 0.9 and nul[3] <= 0.25,
            ]
        else:  # ASCII characters (spaces, digits, punctuation) put NULs in at least a fifth of high bytes
            ok = [nul[1] >= 0.2 and nul[0] <= nul[1] / 4, nul[0] >= 0.2 and nul[1] <= nul[0] / 4]
        high = max(nul[3], nul[0]) if width == 4 else max(nul)
        for name, good in zip(names, ok, strict=True):
            if not good:
                continue
            # Nearly all high bytes NUL over enough code units: (mostly ASCII) text, nothing else
            # looks like that.  Otherwise charset-normalizer must find it plausible as that
            # encoding (not junk whose NULs happen to fall on one side).
            if (high >= 0.9 and n // width >= 8) or charset_normalizer.from_bytes(
                sample[:n], cp_isolation=[name.replace("-", "_")]
            ).best():
                return name
    return None


def _decode_wide(data: bytes, encoding: str, name: str, how: str) -> str:
    """``data`` as UTF-16/32 (a trailing partial code unit, from a cut file, is dropped)."""
    width = 4 if "32" in encoding else 2
    try:
        return data[: len(data) - len(data) % width].decode(encoding)
    except UnicodeDecodeError:
        label = encoding.upper().replace("-LE", " LE").replace("-BE", " BE")
        raise KvcliError(
            f"{name}: looks like {label} text {how} but does not decode as it; convert it to UTF-8 first "
            f"(e.g. iconv -f {encoding.upper().replace('-', '').replace('UTF', 'UTF-')} -t UTF-8)"
        ) from None


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
