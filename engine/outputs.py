"""Atomic output directories: write into a sibling temporary directory, rename into place at the end.

An interrupted or failed run therefore never leaves a half-written output behind. What protects the user's
files and disk, all checked by :func:`check_output_dir` before any work:

- the location must be writable: probed by creating and removing an entry in the nearest existing ancestor
  (``os.access`` says yes to root on a read-only mount, and knows nothing of ACLs);
- ``--overwrite`` replaces only a directory tritonq wrote (:func:`is_tritonq_output`) or an empty one;
- temporary siblings (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) left by a run that was killed are removed, each
  named in one warning; a sibling whose process still runs is left alone.

SIGTERM during the save is handled as SIGINT is: the temporary directory is removed (:func:`sigterm_as_interrupt`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import Terminated, TritonqError, warn

QUANT_JSON = "quantization.json"
GGUF_FILE = "model.gguf"
GGUF_MARKER = b"tritonq.version"  # a metadata key of every GGUF file tritonq writes
GGUF_SCAN_BYTES = 64 * 2**20  # the key sits in the header, after the tokenizer's arrays
LEGACY_STALE_S = 3600.0  # a temporary sibling without a process id (older tritonq) is stale after an hour


# ---------------------------------------------------------------------------------------------------
# what may be replaced


def read_json_object(path: Path, fix: str) -> dict:
    """``path`` parsed as a JSON object; one clear :class:`TritonqError` (naming ``fix``) when it is not."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise TritonqError(f"{path} is not valid JSON ({why}); {fix}") from None
    except OSError as exc:
        raise TritonqError(f"cannot read {path} ({exc.strerror}); {fix}") from None
    if not isinstance(value, dict):
        raise TritonqError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def read_quantization_json(path: Path) -> dict:
    """A ``quantization.json`` as a JSON object, or one clear error (corrupt, not an object, not readable)."""
    return read_json_object(path, "it was damaged after tritonq wrote it: re-run 'tritonq quantize' (or 'pack') "
                                  "into this directory, or restore the file")


def _json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _gguf_has_marker(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                return False
            tail = b""
            read = 4
            while read < GGUF_SCAN_BYTES:
                chunk = fh.read(2**20)
                if not chunk:
                    return False
                if GGUF_MARKER in tail + chunk:
                    return True
                tail = chunk[-len(GGUF_MARKER):]
                read += len(chunk)
    except OSError:
        return False
    return False


def is_tritonq_output(directory: str | os.PathLike) -> bool:
    """Whether tritonq wrote ``directory``: its ``quantization.json`` carries ``tritonq_version`` (every
    quantize and pack output), its ``config.json`` carries tritonq's record, or its ``model.gguf`` our key."""
    path = Path(directory)
    meta = _json_object(path / QUANT_JSON)
    if meta is not None and "tritonq_version" in meta:
        return True
    config = _json_object(path / "config.json")
    if config is not None and ("tritonq_activations" in config
                               or "tritonq" in json.dumps(config.get("quantization_config") or {})):
        return True
    return (path / GGUF_FILE).is_file() and _gguf_has_marker(path / GGUF_FILE)


# ---------------------------------------------------------------------------------------------------
# checks before any work


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(location: Path, out: Path, flag: str = "--output") -> None:
    """Create and remove a temporary directory in ``location`` (or its nearest existing ancestor)."""
    base = _nearest_existing(location)
    if not base.is_dir():
        raise TritonqError(f"{base} is a file, so the output {out} cannot be created under it; choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tritonq-probe-", dir=base))
    except OSError as exc:
        raise TritonqError(f"cannot write the output {out}: {base} is not writable ({exc.strerror}); choose "
                           f"another {flag} or make {base} writable") from None


def check_output_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse an output that cannot be written or must not be replaced; returns the resolved path.

    Creates nothing (the parents are made at save time); removes stale temporaries of earlier killed runs."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise TritonqError(f"output path {out} exists and is not a directory; choose another {flag}")
    try:
        remove_stale_temporaries(out)  # first: it may put a previous output back in place
        non_empty = out.is_dir() and any(out.iterdir())
    except OSError as exc:
        raise TritonqError(f"cannot read the output location {out} ({exc.strerror}); choose another {flag}") from None
    if non_empty:
        if not overwrite:
            raise TritonqError(f"output directory {out} is not empty; pass --overwrite or choose another {flag}")
        if not is_tritonq_output(out):
            names = ", ".join(sorted(p.name for p in out.iterdir())[:3])
            raise TritonqError(f"--overwrite replaces only a directory tritonq wrote, and {out} is not one (it holds "
                               f"{names}); move its files away or choose another {flag}")
        check_writable(out, out, flag)  # the old output's files are removed after the rename
    check_writable(out.parent, out, flag)
    return out


# ---------------------------------------------------------------------------------------------------
# debris of killed runs


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``.NAME.tmp-*`` and ``.NAME.old-*`` siblings of ``out`` whose process is gone; one warning each.

    A ``.old-`` sibling while ``out`` is missing is the previous output, moved aside by a run killed between
    its two renames: it is put back rather than removed. Returns the removed paths."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)?(.*)")
    removed = []
    for entry in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        kind, pid, rest = match.groups()
        if pid is not None and (kind == "old" and not rest or rest.startswith("-")):
            if _pid_alive(int(pid)):
                continue
        elif time.time() - entry.stat().st_mtime < LEGACY_STALE_S:
            continue
        if kind == "old" and not out.exists():
            os.replace(entry, out)
            warn(f"restored the previous output {out} from {entry.name}, left by a run that was killed")
            continue
        size = _size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        warn(f"removed {entry} ({size / 2**20:.1f} MiB), left by an earlier run into {out.name} that was killed")
    return removed


# ---------------------------------------------------------------------------------------------------
# writing


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`~tritonq.errors.Terminated` (a ``KeyboardInterrupt``), so the
    cleanup that runs for Ctrl-C runs for ``kill`` too. Only in the main thread, and only where SIGTERM has
    its default action (a handler the caller installed is kept)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame) -> None:
        raise Terminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (the two renames and the cleanup are not interrupted)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        for s in pending[:1]:
            signal.raise_signal(s)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on failure, Ctrl-C or
    SIGTERM it is removed. Its name carries our process id, so a later run knows when it is stale."""
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)  # `--output out/model` works in a fresh checkout
    with sigterm_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
        except BaseException:
            with _signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        with _signals_deferred():
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The file gets the permissions of the file it replaces, else the usual ``0o666`` less the umask (a bare
    temporary file would be private to its owner)."""
    out = Path(path)
    if out.exists():
        mode = out.stat().st_mode & 0o777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_file`: readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
