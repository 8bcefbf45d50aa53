"""A-BoA's folding leaves the float model unchanged: perplexity of the original and of the folded float model.

The folded model is what A-BoA quantizes: its scales are searched exactly as ``--method aboa`` does (same
calibration, grid and options) and folded into the producers, but every linear keeps its float weights, so
the two perplexities must agree (to 4 decimals on the README's evaluation, boa.md §7). Nothing is written.

    python -m tritonq.bench.aboa_fold --bits 3 --group-size 64 --nsamples 32 --seqlen 512 --seed 0 \\
        --eval-data ../shared/data/wikitext2_test.txt --eval-windows 8 [--option name=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from ..engine.methods.aboa import ABoA
from ..engine.methods.base import LayerResult


class FoldOnlyABoA(ABoA):
    """A-BoA's observation, scale search and folding; the linears keep their (folded) float weights."""

    name = "aboa-fold-only"

    def observe_input(self, group: Any) -> None:
        return None  # BoA's statistics are not needed: nothing is quantized

    def finish(self, group: Any, state: Any, input_scale: torch.Tensor | None) -> list[LayerResult]:
        return [LayerResult(lin.weight.data.clone(), torch.ones(lin.out_features, 1), torch.zeros(lin.out_features, 1),
                            torch.zeros(lin.in_features, dtype=torch.int32)) for lin in group.linears]


def _parse_option(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    for conv in (int, float):
        try:
            return name, conv(value)
        except ValueError:
            pass
    return name, {"true": True, "false": False}.get(value.lower(), value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.aboa_fold", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", required=True)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="an A-BoA option (field name), e.g. awq_salient_ratio=0.01")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from ..engine.adapters import adapter_for
    from ..engine.data import calibration_windows, evaluation_windows, load_corpus, tokenize
    from ..engine.evaluation.perplexity import perplexity
    from ..engine.grid import GridSpec
    from ..engine.model_io import load_model, load_tokenizer
    from ..engine.pipeline import quantize_blocks

    cpu = torch.device("cpu")
    options = ABoA.Options(**dict(_parse_option(o) for o in args.option))
    tokenizer = load_tokenizer(args.model)
    corpus = load_corpus(args.eval_data, split="test")
    windows = evaluation_windows(tokenize(tokenizer, corpus.text), args.eval_seqlen, args.eval_windows, corpus.source)
    calib = load_corpus(args.calib, split="train")
    batches = list(torch.split(calibration_windows(tokenize(tokenizer, calib.text), args.nsamples, args.seqlen,
                                                   args.seed, calib.source), 8))
    model = load_model(args.model, torch.float32)
    original = perplexity(model, windows, cpu, progress=False).perplexity
    method = FoldOnlyABoA(options)
    t0 = time.perf_counter()
    quantize_blocks(model, adapter_for(model.config), method, GridSpec(bits=args.bits, group_size=args.group_size),
                    cpu, batches, progress=False)
    seconds = time.perf_counter() - t0
    folded = perplexity(model, windows, cpu, progress=False).perplexity
    spread = max(float((s.max() / s.min()).item()) for s in method.scales.values())
    row = {"model": args.model, "bits": args.bits, "group_size": args.group_size, "options": options.__dict__,
           "original": original, "folded": folded, "equal_to_4_decimals": f"{original:.4f}" == f"{folded:.4f}",
           "pairs_folded": len(method.scales), "largest_scale_ratio": spread, "search_seconds": round(seconds, 1)}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"original {original:.6f}  folded {folded:.6f}  equal to 4 decimals: {row['equal_to_4_decimals']}  "
              f"({len(method.scales)} scales folded, largest max/min {spread:.3g}, search {seconds:.1f} s)")
    return 0 if row["equal_to_4_decimals"] else 1


if __name__ == "__main__":
    sys.exit(main())
