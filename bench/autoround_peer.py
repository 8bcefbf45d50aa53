"""tritonq's AutoRound on the calibration windows that ``../shared/peers/autoround_run.py`` gives intel/auto-round.

The peer script draws its pydoc windows with ``torch.randint(0, N - seqlen - 1, ...)``; ``tritonq quantize`` draws
``randint(0, N - seqlen + 1, ...)`` (``engine/data.calibration_windows``), so the same seed gives other windows. For
a like-for-like comparison this runs ``quantize`` with the peer's rule in place of ours (same corpus, tokenizer,
seed and count) and prints one line in the peer's ``RESULT`` shape, with ``quantize_total`` as ``quant_s``:

    python -m tritonq.bench.autoround_peer --bits 3 --group-size 64 --iters 200 [--init none] [--seed 0]
        [--compile] [--eval ../shared/data/wikitext2_test.txt] [--windows 8] [--output DIR] [--model DIR]

``--model`` defaults to ``smollm2`` (the GGUF the peer's float32 copy was saved from: the same weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def peer_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, source: str) -> torch.Tensor:
    """The peer script's draw: ``nsamples`` windows starting at ``randint(0, N - seqlen - 1)``."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.shape[1] - seqlen - 1, (nsamples,), generator=gen)
    return torch.stack([ids[0, s:s + seqlen] for s in starts.tolist()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.autoround_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--init", default="none")
    p.add_argument("--target", default="float")
    p.add_argument("--compile", action="store_true", help="autoround --compile (torch.compile of each step)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="../shared/data/wikitext2_test.txt")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)

    from ..engine import api

    api.calibration_windows = peer_windows  # the one change: the peer's window rule
    out = a.output or f"/tmp/tritonq-autoround-w{a.bits}-i{a.iters}-{a.init}-s{a.seed}"
    summary = api.quantize(api.QuantizeOptions(
        output=out, model=a.model, method="autoround", bits=a.bits, group_size=a.group_size, nsamples=a.nsamples,
        seqlen=a.seqlen, seed=a.seed, overwrite=True, eval_data=a.eval, eval_windows=a.windows,
        method_options={"iters": a.iters, "init": a.init, "target": a.target, "compile": a.compile}))
    meta = json.loads((Path(out) / "quantization.json").read_text())
    quant_s = meta["seconds"]["quantize_total"]
    print(f"RESULT method=tritonq-autoround w{a.bits} g{a.group_size} init={a.init} target={a.target} iters={a.iters} "
          f"compile={int(a.compile)} "
          f"seed={a.seed} quant_s={quant_s:.1f} ppl[{Path(a.eval).name}={summary.perplexity:.4f}] windows={a.windows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
