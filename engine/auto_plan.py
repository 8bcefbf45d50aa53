"""The planning half of ``--method auto``: one scoring pass over the float model, then the allocation.

:func:`plan_auto` takes a run's options with ``method="auto"`` and no plan yet, refuses a bad budget or candidate
list before anything loads, scores every candidate of every input-sharing group on the run's own calibration windows
(:class:`~tritonq.engine.methods.auto.CandidateScorer` through the ordinary block loop, so the pass shows the same
progress bar), allocates under ``--avg-bits`` (``auto_bits.allocate``) and returns the options with the plan: the
recipe (``--recipe``'s format), the achieved average bits and the scores. ``api.quantize`` then runs the plan.

The pass holds the model in memory once (float32 on the CPU for SmolLM2-135M: 0.5 GB) and costs one calibration
forward plus one GPTQ solve per GPTQ candidate and group (RTN candidates are nearly free).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import TritonqError
from .auto_bits import (
    GroupOption,
    allocate,
    allocation_recipe,
    check_budget,
    exact_name,
    parse_candidates,
    scheme,
)
from .cache import ActivationCache
from .data import calibration_windows, load_corpus, tokenize
from .distributed import current_collective
from .grid import GridSpec
from .methods.auto import CandidateScorer, GroupScores, describe_scores, group_scores
from .methods.registry import make_method
from .model_io import load_model, load_tokenizer, resolve_device, resolve_dtype
from .preflight import preflight


def plan_auto(opts: Any) -> Any:
    """``opts`` (:class:`~tritonq.engine.api.QuantizeOptions`, ``method="auto"``) with ``method_options.plan`` set;
    options that already hold a plan come back unchanged (a replay)."""
    method = make_method("auto", opts.method_options)
    auto = method.options
    if auto.plan is not None:
        return opts
    if not auto.avg_bits > 0:
        raise TritonqError("--method auto needs a budget: add --avg-bits B (e.g. --avg-bits 3.5)")
    if current_collective().world > 1:
        raise TritonqError("--method auto runs in one process; drop --nproc / torchrun")
    candidates = parse_candidates(auto.candidates)
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    tokenizer = load_tokenizer(opts.model, opts.trust_remote_code)
    spec = GridSpec(bits=max(c.bits for c in candidates), group_size=128 if opts.group_size is None else
                    opts.group_size, sym=opts.sym, mse=opts.mse)
    def ask(method: Any, grid: GridSpec, default_group: bool) -> Any:
        return preflight(method, opts.model, grid, default_group=default_group, act_bits=opts.act_bits,
                         act_scheme=opts.act_scheme, act_sym=opts.act_sym, out_format=opts.out_format,
                         tokenizer=tokenizer, device=device, dtype=dtype, trust_remote_code=opts.trust_remote_code)

    run = ask(method, spec, opts.group_size is None)
    spec = run.spec  # the group size resolved
    # before scoring: the output format must hold a mix of every candidate (each group on one, round robin)
    probe = {"default": scheme(candidates[0], spec.group_size, spec.sym), "rules": [
        {"match": exact_name(f"{run.adapter.blocks}.{i}.{n}"),
         **scheme(candidates[(i * len(run.adapter.linear_groups) + j) % len(candidates)], spec.group_size, spec.sym)}
        for i in range(len(run.widths) // len(run.adapter.linear_names()))
        for j, names in enumerate(run.adapter.linear_groups) for n in names]}
    ask(make_method("auto", dataclasses.replace(auto, plan={"recipe": probe})), spec, False)
    check_budget(auto.avg_bits, candidates, spec.group_size, spec.sym, list(run.widths.values()))

    t0 = time.perf_counter()
    corpus = load_corpus(opts.calib, opts.text_column, split="train")
    windows = calibration_windows(tokenize(tokenizer, corpus.text), opts.nsamples, opts.seqlen, opts.seed,
                                  corpus.source)
    batches = list(torch.split(windows, opts.calib_batch))
    groups = score_candidates(opts.model, dtype, device, spec, candidates, batches, opts.progress,
                              opts.trust_remote_code, fisher_pass=auto.scoring == "fisher")
    plan = plan_from_scores(groups, candidates, auto.avg_bits, auto.scoring, spec)
    plan["scoring_seconds"] = round(time.perf_counter() - t0, 3)
    if opts.progress:
        print(f"--method auto: {plan['achieved_avg_bits']:.4f} bits per weight (budget {auto.avg_bits}), "
              f"{plan['chosen']} over {len(groups)} groups of linears")
    options = dataclasses.replace(auto, plan=plan)
    return dataclasses.replace(opts, method_options=options, bits=spec.bits, group_size=spec.group_size)


def score_candidates(model_name: str, dtype: torch.dtype, device: torch.device, spec: GridSpec,
                     candidates: tuple, batches: list[torch.Tensor], progress: bool = True,
                     trust_remote_code: bool = False, fisher_pass: bool = False) -> list[GroupScores]:
    """Every candidate's error on every group of the float model (``methods/auto.py``), block by block; with
    ``fisher_pass``, first the loss gradients on every linear's outputs (:func:`output_fisher`)."""
    from .adapters import adapter_for
    from .pipeline import quantize_blocks

    model = load_model(model_name, dtype, trust_remote_code)
    adapter = adapter_for(model.config)
    fisher = output_fisher(model, adapter, batches, device, progress) if fisher_pass else None
    scorer = CandidateScorer(candidates, fisher)
    scorer.name = "auto scoring"  # the progress bar's label
    quantize_blocks(model, adapter, scorer, spec, device, batches, progress=progress,
                    cache=ActivationCache("device", device))
    return scorer.groups


def output_fisher(model: torch.nn.Module, adapter: Any, batches: list[torch.Tensor], device: torch.device,
                  progress: bool = True, windows_per_step: int = 2) -> dict[str, torch.Tensor]:
    """The mean over calibration tokens of the squared gradient of the next-token loss (mean over tokens) on every
    output of every block linear of the float model: ``{full name: [N]}`` (the ``fisher`` scoring, methods/auto.py).
    ``windows_per_step`` windows per backward bound the memory (the logits of a step are windows x seqlen x vocab)."""
    names = [f"{adapter.blocks}.{i}.{n}" for i in range(len(adapter.block_list(model)))
             for n in adapter.linear_names()]
    sums = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    tokens = 0

    def keeper(name: str):
        def on_grad(g: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            sums[name].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu())

        def on_output(module, args, out):
            out.register_hook(on_grad)
        return on_output

    handles = [model.get_submodule(n).register_forward_hook(keeper(n)) for n in names]
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    steps = [w for b in batches for w in torch.split(b, windows_per_step)]
    try:
        for ids in tqdm(steps, desc="auto loss gradients", unit="step", disable=not progress):
            ids = ids.to(device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            tokens += ids.numel()
    finally:
        for h in [*handles, embed]:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.to("cpu")
    # each step's loss is a mean over its tokens: scale its gradients back to per-token ones, then average
    scale = (tokens / len(steps)) ** 2 / tokens
    return {n: (s * scale).float() for n, s in sums.items()}


def plan_from_scores(groups: list[GroupScores], candidates: tuple, avg_bits: float, scoring: str,
                     spec: GridSpec) -> dict:
    """Allocate under ``avg_bits`` on ``scoring`` and describe the result as ``quantization.json`` records it."""
    options = [GroupOption(g.names, g.shapes, s) for g, s in zip(groups, group_scores(groups, scoring))]
    result = allocate(options, candidates, avg_bits, spec.group_size, spec.sym)
    counts: dict[str, int] = {}
    for c in result.choices:
        counts[c.label] = counts.get(c.label, 0) + 1
    return {"recipe": allocation_recipe(options, result.choices, spec.group_size, spec.sym),
            "achieved_avg_bits": round(result.avg_bits, 6), "total_score": result.score,
            "chosen": ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())),
            "scores": describe_scores(groups)}
