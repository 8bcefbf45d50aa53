"""Where the calibration activations wait between stages: the compute device, CPU RAM, or files on disk.

The pipeline caches every chunk's block inputs, the replayed sub-module outputs and a tail group's inputs
(``pipeline.py``). ``--offload-activations cpu`` keeps them in host RAM so the accelerator holds only the
working chunk; ``--offload-activations disk DIR`` keeps them in memory-mapped files under ``DIR``: each
tensor is copied into a file that is unlinked at once, so its pages are written back by the kernel and
dropped under memory pressure, and the space is freed when the tensor is (nothing to clean up after a
crash).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..errors import TritonqError

PLACES = ("device", "cpu", "disk")


class ActivationCache:
    """``keep(t)`` returns ``t`` where the cache lives; ``place`` is one of :data:`PLACES`."""

    def __init__(self, place: str, device: torch.device, directory: str | os.PathLike | None = None) -> None:
        if place not in PLACES:
            raise TritonqError(f"--offload-activations takes cpu or disk DIR, got {place!r}")
        self.place = place
        self.device = device if place == "device" else torch.device("cpu")
        self.dir: Path | None = None
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
        return mapped.view(tensor.shape)

    def describe(self) -> str:
        return f"disk ({self.dir})" if self.dir is not None else str(self.device)
