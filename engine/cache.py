"""Where the calibration activations wait between stages: the compute device, CPU RAM, or files on disk.

The pipeline caches every chunk's block inputs, the replayed sub-module outputs and a tail group's inputs
(``pipeline.py``). ``--offload-activations cpu`` keeps them in host RAM so the accelerator holds only the
working chunk; ``--offload-activations disk DIR`` keeps them in memory-mapped files under ``DIR``: each
tensor is copied into a file that is unlinked at once, so the space is freed when the tensor is (nothing to
clean up after a crash). Pages of a mapping stay resident (and counted in the process's memory) until the
kernel needs them, so the pipeline calls :meth:`ActivationCache.page_out` after each chunk and stage, which
asks the kernel to write them back and drop them now (``madvise(MADV_PAGEOUT)``, Linux >= 5.4; elsewhere the
kernel drops them under memory pressure): only the chunk at work is resident.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import weakref
from pathlib import Path

import torch
from torch import Tensor

from ..errors import TritonqError

PLACES = ("device", "cpu", "disk")
MADV_PAGEOUT = 21  # linux/mman.h, Linux >= 5.4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ActivationCache:
    """``keep(t)`` returns ``t`` where the cache lives; ``place`` is one of :data:`PLACES`."""

    def __init__(self, place: str, device: torch.device, directory: str | os.PathLike | None = None) -> None:
        if place not in PLACES:
            raise TritonqError(f"--offload-activations takes cpu or disk DIR, got {place!r}")
        self.place = place
        self.device = device if place == "device" else torch.device("cpu")
        self.dir: Path | None = None
        self._mapped: list[weakref.ref] = []  # disk: every mapped tensor still alive
        self._madvise = None
        if place == "disk":
            if directory is None:
                raise TritonqError("--offload-activations disk needs a directory: --offload-activations disk DIR")
            self.dir = Path(directory).expanduser()
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                probe = tempfile.NamedTemporaryFile(dir=self.dir)
                probe.close()
            except OSError as exc:
                raise TritonqError(f"cannot write calibration activations to {self.dir} ({exc.strerror}); "
                                   "give a writable directory with room for them") from None
        elif directory is not None:
            raise TritonqError(f"a directory is given with --offload-activations {place}; only 'disk' takes one")

    def keep(self, tensor: Tensor) -> Tensor:
        if self.dir is None:
            return tensor.to(self.device)
        fd, name = tempfile.mkstemp(prefix="tritonq-act-", suffix=".bin", dir=self.dir)
        try:
            nbytes = tensor.numel() * tensor.element_size()
            os.ftruncate(fd, max(nbytes, 1))
            mapped = torch.from_file(name, shared=True, size=tensor.numel(), dtype=tensor.dtype)
        finally:
            os.close(fd)
            os.unlink(name)  # the mapping keeps the data; the space returns when the tensor is freed
        mapped.copy_(tensor.reshape(-1))
        kept = mapped.view(tensor.shape)
        self._mapped.append(weakref.ref(kept))
        return kept

    def page_out(self) -> None:
        """Disk: write the mapped activations back and drop their pages from memory now (a no-op otherwise)."""
        if self.dir is None or self._madvise is False:
            return
        if self._madvise is None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                self._madvise = libc.madvise
                self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError):
                self._madvise = False
                return
        alive = []
        for ref in self._mapped:
            t = ref()
            if t is None:
                continue
            alive.append(ref)
            start = t.data_ptr() - t.data_ptr() % _PAGE
            length = t.data_ptr() + t.numel() * t.element_size() - start
            if self._madvise(start, length, MADV_PAGEOUT) != 0:  # an old kernel: leave it to memory pressure
                self._madvise = False
                return
        self._mapped = alive

    def describe(self) -> str:
        return f"disk ({self.dir})" if self.dir is not None else str(self.device)
