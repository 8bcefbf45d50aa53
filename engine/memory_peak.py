"""Peak memory per block: host resident memory (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) and the
accelerator's allocator peak. Elsewhere the host figure is the process's lifetime peak (``ru_maxrss``)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_memory() -> None:
    """Start a new peak: writing 5 to clear_refs resets the resident high-water mark (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the lifetime peak is reported instead
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def host_peak_bytes() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def peak_memory() -> dict[str, float]:
    """The peaks since the last reset, in MB: ``host_peak_mb`` and ``device_peak_mb`` (0 without CUDA)."""
    device = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {"host_peak_mb": round(host_peak_bytes() / 2**20, 1), "device_peak_mb": round(device / 2**20, 1)}
