"""Peak resident memory of ``tritonq quantize`` with the weights streamed from disk against the model held whole.

Each run is a fresh process under ``/usr/bin/time -v`` (its "Maximum resident set size"), beside the bare
interpreter with torch and transformers imported, so the table shows what a run adds::

    python -m tritonq.bench.stream_rss --model /work/models/llama-24l --method gptq --group-size 128 \\
        --nsamples 32 --seqlen 512 --modes stream memory

Prints one Markdown row per mode: wall seconds, peak RSS, RSS above the interpreter, and the largest per-block
peak recorded in ``quantization.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import sys
from tritonq.engine.api import QuantizeOptions, quantize
kw = dict(output=sys.argv[1], model=sys.argv[2], method=sys.argv[3], bits=int(sys.argv[4]),
          group_size=int(sys.argv[5]), nsamples=int(sys.argv[6]), seqlen=int(sys.argv[7]), out_format=sys.argv[8],
          stream={"stream": True, "memory": False}[sys.argv[9]], progress=False, overwrite=True)
if sys.argv[10] != "device":
    kw["offload_activations"] = sys.argv[10]
quantize(QuantizeOptions(**kw))
"""
BARE = "import torch, transformers, tritonq.engine.api"


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a child process under /usr/bin/time -v."""
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return wall, int(peak.group(1)) / 1024


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--method", default="gptq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--format", default="fake")
    p.add_argument("--cache", default="device", choices=["device", "cpu"])
    p.add_argument("--modes", nargs="+", default=["stream", "memory"], choices=["stream", "memory"])
    args = p.parse_args(argv)
    _, bare = peak_rss_mb([sys.executable, "-c", BARE])
    print(f"bare interpreter (torch + transformers + tritonq imported): {bare:.0f} MB")
    print("| weights | wall s | peak RSS MB | above interpreter MB | largest block peak MB |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="tritonq-rss-") as scratch:
            out = Path(scratch) / "out"
            wall, peak = peak_rss_mb([sys.executable, "-c", RUN, str(out), args.model, args.method, str(args.bits),
                                      str(args.group_size), str(args.nsamples), str(args.seqlen), args.format, mode,
                                      args.cache])
            meta = json.loads((out / "quantization.json").read_text())
        block = meta["memory"]["host_peak_mb"]
        print(f"| {meta['memory']['weights']} | {wall:.0f} | {peak:.0f} | {peak - bare:.0f} | {block:.0f} |")


if __name__ == "__main__":
    main()
