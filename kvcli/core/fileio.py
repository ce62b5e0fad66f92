"""Where kvcli keeps files, and writing them so that a failure never leaves half a file behind."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$KVCLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvcli``, else ``~/.cache/kvcli``."""
    if os.environ.get("KVCLI_CACHE_DIR"):
        return Path(os.environ["KVCLI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kvcli"


def _umask() -> int:
    """The process umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: Path) -> int:
    """The permissions ``path`` gets when kvcli writes it: an existing file's own mode (a
    rewrite keeps them), else what ``open()`` would give a new file under the user's umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via a temporary file beside it, then rename: the
    file is whole or untouched, even if the process is killed.  It gets the permissions
    ``new_file_mode`` says (``mkstemp`` alone would leave 0600)."""
    path = Path(path)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, replace: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temporary file beside it, then put it in place: the
    file is whole or absent.  Without ``replace`` an existing ``path`` is never replaced, even
    by a race (a hard link, which fails if the name exists; a rename where links are not
    supported, after a check)."""
    from .errors import KvcliError

    path = Path(path)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.fchmod(fh.fileno(), mode)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KvcliError(f"{path}: exists; kvcli does not replace it (use --force)", option="force") from None
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise KvcliError(
                        f"{path}: exists; kvcli does not replace it (use --force)", option="force"
                    ) from None
                os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def read_text_file(path: str | os.PathLike, what: str, limit: int = 16 * 1024 * 1024) -> str:
    """A small UTF-8 text file the user named (questions, a preset, the config file), read
    safely: only a regular file (a FIFO or a device would block or never end), at most
    ``limit`` bytes; every failure a one-line ``KvcliError`` naming ``what`` and the file."""
    from .errors import KvcliError

    name = f"cannot read {what} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KvcliError(f"{name}: no such file") from None
    except OSError as exc:
        raise KvcliError(f"{name}: {exc.strerror or type(exc).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KvcliError(f"{name}: not a regular file")
        if info.st_size > limit:
            raise KvcliError(f"{name}: larger than {limit:,} bytes")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise KvcliError(f"{name}: {exc.strerror or type(exc).__name__}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise KvcliError(f"{name}: larger than {limit:,} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KvcliError(f"{what} {path} is not UTF-8 text") from None
