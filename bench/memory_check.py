"""Peak RSS per stage of a quantize run, beside what ``engine/memory.py`` predicts for it.

``python -m tritonq.bench.memory_check --model M --method X [--nsamples N --seqlen T --calib-batch B] [--json F]``
runs today's ``quantize`` on the CPU and reads the kernel's resident-set high-water mark (``VmHWM`` of
``/proc/self/status``), resetting it (``echo 5 > /proc/self/clear_refs``) at every phase boundary, so each
save. Per block it reports the peak above the RSS at the block's start: that rise is the per-block part the
estimate models (replays, the next block's inputs, one chunk's intermediates, the method's state), because the
block's weights and its inputs are already resident when the block starts on the in-memory path.

Linux only (``/proc``). A helper for bench/RESULTS.md, not part of the engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

MIB = 2**20


def _status(field: str) -> int:
    """One ``kB`` field of ``/proc/self/status`` in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """High-water marks of the RSS over named phases (the kernel's VmHWM, reset between phases)."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}

    @staticmethod
    def reset() -> int:
        Path("/proc/self/clear_refs").write_text("5")
        return _status("VmRSS")

    @staticmethod
    def peak() -> int:
        return _status("VmHWM")


def measure(args: argparse.Namespace) -> dict:
    meter = PeakMeter()
    import torch  # noqa: F401 - the interpreter as a run sees it: torch and transformers imported
    import transformers  # noqa: F401
    from tritonq.engine import pipeline
    from tritonq.engine.api import QuantizeOptions, quantize
    from tritonq.engine.memory import estimate_for_options
    from tritonq.engine.model_io import load_config

    bare = _status("VmRSS")
    blocks: list[dict] = []
    for name in ("quantize_block", "quantize_whole_block"):
        original = getattr(pipeline, name)

        def step(*a, _original=original, **kw):
            start = meter.reset()
            t0 = time.perf_counter()
            out = _original(*a, **kw)
            blocks.append({"index": a[1], "rss_start": start, "peak": meter.peak(),
                           "seconds": time.perf_counter() - t0})
            return out
        setattr(pipeline, name, step)

    capture = {}
    original_capture = pipeline.capture_block_inputs

    def capture_step(*a, **kw):
        capture["rss_start"] = meter.reset()
        out = original_capture(*a, **kw)
        capture["peak"] = meter.peak()
        capture["rss_end"] = _status("VmRSS")
        return out
    pipeline.capture_block_inputs = capture_step

    out = args.output or tempfile.mkdtemp(prefix="tritonq-memcheck-")
    opts = QuantizeOptions(output=out, model=args.model, method=args.method, nsamples=args.nsamples,
                           seqlen=args.seqlen, calib_batch=args.calib_batch, progress=False, overwrite=True,
                           device="cpu")
    start = meter.reset()
    summary = quantize(opts)
    after_blocks = max(b["peak"] for b in blocks)
    run_peak = meter.peak()  # since the last block: the save
    estimate = estimate_for_options(opts, load_config(args.model))
    rises = [b["peak"] - b["rss_start"] for b in blocks]
    result = {
        "model": args.model, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "calib_batch": args.calib_batch, "bare_interpreter_mib": bare / MIB, "rss_before_run_mib": start / MIB,
        "capture_peak_mib": capture.get("peak", 0) / MIB, "capture_rise_mib": (capture.get("peak", 0) - capture.get(
            "rss_start", 0)) / MIB,
        "block_rss_start_mib": [b["rss_start"] / MIB for b in blocks],
        "block_peak_mib": [b["peak"] / MIB for b in blocks],
        "block_rise_mib": [r / MIB for r in rises], "max_block_rise_mib": max(rises) / MIB,
        "block_seconds": [round(b["seconds"], 2) for b in blocks],
        "blocks_peak_mib": after_blocks / MIB, "save_peak_mib": run_peak / MIB,
        "seconds": summary.seconds,
        "estimate": {k: v / MIB for k, v in estimate.components.items()},
        "estimate_block_rise_mib": estimate.block_rise() / MIB,
        "estimate_peak_host_mib": estimate.peak_host / MIB,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.memory_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--method", default="gptq")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--output", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the result here as JSON")
    args = p.parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
