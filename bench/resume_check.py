"""Kill a quantize run with SIGKILL at a random point, continue it with ``--resume``, and compare the files with an
uninterrupted run's (sha256), with the wall time of each run::

    python -m tritonq.bench.resume_check --seed 1 -- --model smollm2 --method gptq --bits 4 --group-size 64 \\
        --nsamples 32 --seqlen 512

Everything after ``--`` goes to ``tritonq quantize`` (``--output`` is added). The kill lands while a random block
(after the first, before the last) is being worked on: the script waits until the work directory's
``progress.json`` shows the blocks before it committed, then a random share of one block's time more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "tritonq.cli", "quantize", *args, "--no-progress"]


def _sha(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(directory.iterdir())
            if f.suffix == ".safetensors" or f.name in ("config.json", "model.gguf")}


def _done(work: Path) -> int:
    try:
        return int(json.loads((work / "progress.json").read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=1, help="how many times to kill the run before letting it finish")
    p.add_argument("quantize_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    extra = [a for a in args.quantize_args if a != "--"]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="tritonq-resume-") as scratch:
        full, out = Path(scratch) / "full", Path(scratch) / "out"
        work = out.with_name(out.name + ".tritonq-work")
        t0 = time.perf_counter()
        subprocess.run(_cli([*extra, "--output", str(full)]), check=True, capture_output=True)
        full_s = time.perf_counter() - t0
        blocks = len(json.loads((full / "quantization.json").read_text())["memory"]["per_block"])
        per_block = full_s / blocks
        rows = []
        for _ in range(args.kills):
            target = rng.randint(max(1, _done(work) + 1), blocks - 2)
            t0 = time.perf_counter()
            proc = subprocess.Popen(_cli([*extra, "--output", str(out), *(["--resume"] if work.exists() else [])]),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while _done(work) < target and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.random() * per_block * 0.9)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            rows.append((f"killed (SIGKILL) in block {_done(work)}", time.perf_counter() - t0, _done(work)))
        t0 = time.perf_counter()
        subprocess.run(_cli([*extra, "--output", str(out), "--resume"]), check=True, capture_output=True)
        resumed_s = time.perf_counter() - t0
        meta = json.loads((out / "quantization.json").read_text())
        same = _sha(full) == _sha(out)
        print(f"{blocks} blocks; uninterrupted run {full_s:.1f} s")
        print("| run | wall s | blocks finished before |")
        print("|---|---|---|")
        for label, secs, done in rows:
            print(f"| {label} | {secs:.1f} | {done} |")
        print(f"| --resume (from block {meta.get('resumed_from_block')}) | {resumed_s:.1f} | - |")
        print(f"safetensors and config byte-identical to the uninterrupted run: {same}")
        for name, digest in _sha(out).items():
            print(f"  {name} {digest} (uninterrupted {_sha(full).get(name)})")


if __name__ == "__main__":
    main()
