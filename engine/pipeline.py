"""The layer loop: capture the inputs of block 0, then for each decoder block accumulate the Hessians of
its linear groups in dependency order (each group sees the already quantized groups before it),
quantize them, and run the block again to produce the next block's inputs (quantized propagation,
as GPTQ's ``llama_sequential`` with true-sequential order).

Only the block being quantized sits on the compute device; the model stays on the CPU.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .grid import GridSpec
from .hessian import HessianAccumulator
from .methods import LayerResult, Method


class _StopForward(Exception):
    """Raised by a hook once it has what it needs; the rest of the forward pass is skipped."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, one tensor per calibration batch, and the layer kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


@dataclass
class QuantizeReport:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def capture_block_inputs(
    model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], device: torch.device
) -> BlockInputs:
    """Run the embeddings on ``device`` and record what enters block 0 (hidden states and kwargs)."""
    blocks = adapter.block_list(model)
    moved = [blocks[0]]
    for name in adapter.embeddings:
        try:
            moved.append(model.get_submodule(name))
        except AttributeError:
            continue  # optional module absent in this variant (e.g. OPT's project_in)
    for mod in moved:
        mod.to(device)
    captured = BlockInputs([], [])

    def hook(_module, args, kwargs):
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for mod in moved:
            mod.to("cpu")
    return captured


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _group_hessian(block: nn.Module, first: nn.Linear, inputs: BlockInputs, device) -> torch.Tensor:
    """Hessian of the input shared by a group, from a forward pass stopped right after that input."""
    acc = HessianAccumulator(first.in_features, device)

    def hook(_module, args):
        acc.add(args[0])
        raise _StopForward

    handle = first.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            try:
                _run_block(block, hidden, kwargs)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return acc.hessian


def quantize_blocks(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    spec: GridSpec,
    device: torch.device,
    batches: list[torch.Tensor] | None,
    progress: bool = True,
    on_block: Callable[[int, float], None] | None = None,
) -> QuantizeReport:
    """Quantize every decoder block of ``model`` in place; returns the grid parameters per linear."""
    report = QuantizeReport()
    blocks = adapter.block_list(model)
    prefix = adapter.blocks
    inputs = None
    with torch.no_grad():
        if method.needs_calibration:
            t0 = time.perf_counter()
            inputs = capture_block_inputs(model, adapter, batches or [], device)
            report.seconds["capture"] += time.perf_counter() - t0
        bar = tqdm(range(len(blocks)), desc=f"{method.name} blocks", unit="block", disable=not progress)
        for i in bar:
            block = blocks[i].to(device)
            losses = 0.0
            for group in adapter.linear_groups:
                linears = [block.get_submodule(name) for name in group]
                names = [f"{prefix}.{i}.{name}" for name in group]
                hessian = None
                if method.needs_hessian:
                    t0 = time.perf_counter()
                    hessian = _group_hessian(block, linears[0], inputs, device)
                    report.seconds["hessian"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                results = method.quantize_group([lin.weight.data for lin in linears], hessian, spec, names)
                for lin, name, res in zip(linears, names, results):
                    lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
                    report.layers[name] = LayerResult(
                        res.weight.new_empty(0), res.scale.cpu(), res.zero.cpu(), res.g_idx.cpu(), res.info
                    )
                    losses += res.info.get("loss", 0.0) / len(results)
                report.seconds["quantize"] += time.perf_counter() - t0
            if inputs is not None:
                t0 = time.perf_counter()
                inputs.hidden = [_run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
                report.seconds["propagate"] += time.perf_counter() - t0
            blocks[i] = block.to("cpu")
            if method.needs_hessian:
                bar.set_postfix(loss=f"{losses:.3g}")
            if on_block is not None:
                on_block(i, losses)
    return report
