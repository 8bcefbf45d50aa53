"""Choose GPTQ's defaults from calibration-side evidence: held-out loss on the calibration corpus.

The calibration corpus (``pydoc`` by default) is split by position: windows are drawn from its first 90%,
and every candidate setting is scored by the perplexity of the quantized model on the last 10% (windows
of 2048 tokens), never on the evaluation texts. Texts named with ``--check`` are scored too, for the
record only (the choice reads the held-out column alone). Calibration seeds move 3-bit results by a few
per cent, so every setting runs under each ``--seeds`` value and the table reports the mean.

    python -m tritonq.bench.gptq_defaults --bits 3 --seeds 0 1 2 \\
        --settings none:0.01 none:0.05 none:0.1 static:0.01 static:0.05 static:0.1 [--check FILE ...] [--json]

The float model is loaded once; each run quantizes a fresh copy in memory (nothing is written).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch


def _windows(ids: torch.Tensor, seqlen: int, limit: int | None) -> torch.Tensor:
    from ..engine.data import evaluation_windows

    return evaluation_windows(ids, seqlen, limit, "held-out")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.gptq_defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--bits", type=int, nargs="+", default=[3])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=["none:0.01", "static:0.1"],
                   help="act_order:damp pairs (act_order none, static or dynamic); 'rtn' for the RTN baseline")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--check", nargs="*", default=[], help="texts scored for the record (not used to choose)")
    p.add_argument("--check-windows", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from ..engine.adapters import adapter_for
    from ..engine.data import calibration_windows, load_corpus, tokenize
    from ..engine.evaluation.perplexity import perplexity
    from ..engine.grid import GridSpec
    from ..engine.methods.registry import make_method
    from ..engine.model_io import load_model, load_tokenizer
    from ..engine.pipeline import quantize_blocks

    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(args.model)
    float_model = load_model(args.model, torch.float32)
    adapter = adapter_for(float_model.config)
    ids = tokenize(tokenizer, load_corpus(args.calib).text)
    cut = int(ids.shape[1] * (1 - args.heldout_fraction))
    calib_ids, heldout = ids[:, :cut], _windows(ids[:, cut:], 2048, None)
    checks = {path: _windows(tokenize(tokenizer, load_corpus(path, split="test").text), 2048, args.check_windows)
              for path in args.check}
    rows = []
    for bits in args.bits:
        spec = GridSpec(bits=bits, group_size=args.group_size)
        for setting in args.settings:
            for seed in args.seeds if setting != "rtn" else args.seeds[:1]:  # RTN uses no data
                model = copy.deepcopy(float_model)
                if setting == "rtn":
                    method, batches = make_method("rtn"), None
                else:
                    act_order, damp = setting.split(":")
                    method = make_method("gptq", {"act_order": act_order, "damp": float(damp)})
                    windows = calibration_windows(calib_ids, args.nsamples, args.seqlen, seed, args.calib)
                    batches = list(torch.split(windows, 8))
                t0 = time.perf_counter()
                quantize_blocks(model, adapter, method, spec, cpu, batches, progress=False)
                row = {"bits": bits, "setting": setting, "seed": seed, "quantize_s": round(time.perf_counter() - t0, 1),
                       "heldout": perplexity(model, heldout, cpu, progress=False).perplexity}
                for path, windows in checks.items():
                    row[path] = perplexity(model, windows, cpu, progress=False).perplexity
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["heldout", *args.check]
    print(f"| bits | setting | seeds | {' | '.join(c.rsplit('/', 1)[-1] + ' (mean ± sd)' for c in columns)} |")
    print("| --- | --- | --- |" + " --- |" * len(columns))
    for bits in args.bits:
        for setting in args.settings:
            sel = [r for r in rows if r["bits"] == bits and r["setting"] == setting]
            cells = []
            for c in columns:
                values = [r[c] for r in sel]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.2f} ± {sd:.2f}")
            print(f"| {bits} | {setting} | {len(sel)} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
