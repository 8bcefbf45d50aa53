"""What every side of ``tritonq bench decode`` measures the same way, torch or llama.cpp: resident memory and
the summary of timed runs (:mod:`tritonq.bench.decode`, :mod:`tritonq.bench.decode_llama_cpp`)."""

from __future__ import annotations

import statistics
from pathlib import Path


def rss_bytes() -> dict[str, int]:
    """Resident set size now and at its peak (``VmRSS``, ``VmHWM`` of /proc/self/status); zeros elsewhere."""
    out = {"rss": 0, "peak_rss": 0}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "peak_rss"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def rate_summary(rates: list[float]) -> dict:
    """Median, min and max of the timed runs' rates."""
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
