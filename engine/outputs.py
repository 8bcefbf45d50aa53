"""Atomic output directories: write into a sibling temporary directory, rename into place at the end.

An interrupted or failed run therefore never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import TritonqError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; returns the resolved path."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise TritonqError(f"output path {out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TritonqError(f"output directory {out} is not empty; pass --overwrite or choose another --output")
    if out.parent.exists() and not out.parent.is_dir():
        raise TritonqError(f"parent of the output {out.parent} is not a directory; choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)  # `--output out/model` works in a fresh checkout
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on failure it is removed."""
    out = check_output_dir(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
