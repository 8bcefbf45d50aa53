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
