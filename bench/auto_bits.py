"""``--method auto`` against its baselines at one budget, from one scoring pass (issue 22 item 3).

Two protocols:

* ``--heldout`` (choosing the scoring, calibration side only): calibration windows from the first 90% of the
  calibration corpus (as ``bench/gptq_defaults.py``), perplexity on its last 10% (windows of 2048);
* otherwise (the done-when): calibration windows from the whole corpus, exactly as ``tritonq quantize`` draws them,
  perplexity on ``--eval`` (WikiText-2 test, first ``--eval-windows`` windows of 2048).

For each seed: one scoring pass, then one quantized copy of the float model per row: the allocation under each
``--runs``, the "first and last k blocks at the high width, the rest at the low one" heuristic with the largest
``k`` whose average bits stay within the budget (``auto_bits.heuristic_choices``), and with ``--uniform`` the
uniform GPTQ runs at the low and high widths. Each row prints as one JSON line on stderr when done.

    python -m tritonq.bench.auto_bits --avg-bits 3.5 --seeds 0 --heldout
    python -m tritonq.bench.auto_bits --avg-bits 3.5 --seeds 0 --eval /work/shared/data/wikitext2_test.txt --uniform
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonq.bench.auto_bits", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--calib", default="pydoc")
    p.add_argument("--avg-bits", type=float, default=3.5)
    p.add_argument("--candidates", default="gptq:2,gptq:3,gptq:4")
    p.add_argument("--runs", nargs="*", default=["absolute", "relative"],
                   help="allocations to run: SCORING or SCORING@CANDIDATES (a subset of --candidates)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--heldout", action="store_true", help="calibrate on the first 90%%, score on the last 10%%")
    p.add_argument("--eval", default=None, help="evaluation text (without --heldout)")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--uniform", action="store_true", help="also the uniform GPTQ runs at the low and high widths")
    p.add_argument("--no-heuristic", action="store_true")
    args = p.parse_args(argv)

    from ..engine.adapters import adapter_for
    from ..engine.auto_bits import Candidate, GroupOption, allocation_recipe, heuristic_choices, parse_candidates
    from ..engine.auto_plan import plan_from_scores, score_candidates
    from ..engine.data import calibration_windows, evaluation_windows, load_corpus, tokenize
    from ..engine.evaluation.perplexity import perplexity
    from ..engine.grid import GridSpec
    from ..engine.methods.auto import GroupScores
    from ..engine.methods.registry import make_method
    from ..engine.model_io import load_model, load_tokenizer
    from ..engine.pipeline import quantize_blocks

    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(args.model)
    float_model = load_model(args.model, torch.float32)
    adapter = adapter_for(float_model.config)
    ids = tokenize(tokenizer, load_corpus(args.calib).text)
    if args.heldout:
        cut = int(ids.shape[1] * 0.9)
        calib_ids, scored = ids[:, :cut], evaluation_windows(ids[:, cut:], 2048, None, "held-out")
        label = "held-out " + args.calib
    else:
        calib_ids = ids
        scored = evaluation_windows(tokenize(tokenizer, load_corpus(args.eval, split="test").text), 2048,
                                    args.eval_windows, args.eval)
        label = args.eval
    candidates = parse_candidates(args.candidates)
    low = Candidate("gptq", min(c.bits for c in candidates if c.bits > min(x.bits for x in candidates)))
    high = Candidate("gptq", max(c.bits for c in candidates))
    spec = GridSpec(bits=high.bits, group_size=args.group_size)

    def run(method, batches, row: dict, grid: GridSpec = spec) -> None:
        model = copy.deepcopy(float_model)
        t0 = time.perf_counter()
        quantize_blocks(model, adapter, method, grid, cpu, batches, progress=False)
        row.update(quantize_s=round(time.perf_counter() - t0, 1), ppl=perplexity(model, scored, cpu, False).perplexity,
                   text=label)
        print(json.dumps(row), file=sys.stderr, flush=True)

    for seed in args.seeds:
        windows = calibration_windows(calib_ids, args.nsamples, args.seqlen, seed, args.calib)
        batches = list(torch.split(windows, 8))
        t0 = time.perf_counter()
        if args.runs:
            groups = score_candidates(args.model, torch.float32, cpu, spec, candidates, batches, progress=False,
                                      fisher_pass=any(r.startswith("fisher") for r in args.runs))
            print(json.dumps({"seed": seed, "scoring_s": round(time.perf_counter() - t0, 1)}), file=sys.stderr,
                  flush=True)
        else:  # the heuristic alone needs only the groups' names and shapes
            groups = [GroupScores(full := [f"{adapter.blocks}.{i}.{n}" for n in names],
                                  [tuple(float_model.get_submodule(n).weight.shape) for n in full], i, {}, 0.0)
                      for i in range(len(adapter.block_list(float_model))) for names in adapter.linear_groups]
        for item in args.runs:
            scoring, _, subset = item.partition("@")
            subset = subset or args.candidates
            plan = plan_from_scores(groups, parse_candidates(subset), args.avg_bits, scoring, spec)
            run(make_method("auto", {"avg_bits": args.avg_bits, "candidates": subset, "plan": plan}), batches,
                {"seed": seed, "run": f"auto {scoring} {subset}", "avg_bits": plan["achieved_avg_bits"],
                 "chosen": plan["chosen"]})
        if not args.no_heuristic:
            options = [GroupOption(g.names, g.shapes, {}) for g in groups]
            blocks = [g.block for g in groups]
            total = sum(o.weights() for o in options)
            best = None
            for edge in range(0, max(blocks) // 2 + 2):
                choices = heuristic_choices(blocks, low, high, edge)
                bits = sum(o.cost(c, spec.group_size, spec.sym) for o, c in zip(options, choices)) / total
                if bits <= args.avg_bits + 1e-9:
                    best = (edge, choices, bits)
            edge, choices, bits = best
            plan = {"recipe": allocation_recipe(options, choices, spec.group_size, spec.sym)}
            run(make_method("auto", {"avg_bits": args.avg_bits, "plan": plan}), batches,
                {"seed": seed, "run": f"heuristic: first/last {edge} blocks {high.label}, rest {low.label}",
                 "avg_bits": round(bits, 6)})
        if args.uniform:
            for cand in (low, high):
                run(make_method("gptq"), batches, {"seed": seed, "run": f"uniform {cand.label}", "bits": cand.bits},
                    GridSpec(bits=cand.bits, group_size=args.group_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
