"""The layer loop: one forward of each block over the calibration tokens, in stages at the group boundaries.

Capture what enters block 0, then for every block and every linear group in dependency order:

1. ``method.observe(group)`` registers what the method wants to see (inputs or outputs of named modules,
   queries and keys after RoPE);
2. the calibration chunks (``--calib-batch`` windows each) run through the block, each chunk stopping as
   soon as every registered observation has fired for it, so all chunks advance in lockstep to the same
   point of the block;
3. ``method.quantize(group, state)`` solves and the weights are written into the block, so the groups
   after it see quantized predecessors (true-sequential order, as GPTQ's ``llama_sequential``).

Nothing expensive runs twice: a stage re-runs only the cheap modules before its stop point (norms,
residual adds) and replays the sub-modules already done from cached outputs. When a group whose linear
is a *tail* of a sub-module (``o_proj`` of the attention, ``down_proj`` of the MLP) is quantized, the
chunks' inputs to it, saved when the stage stopped there, give the sub-module's final output
(``tail(x)``), and later stages replay that output instead of computing attention or the MLP again. The
last stage runs the rest of the block and yields the next block's inputs. Per block that is one forward
of every linear and of the attention core, the same work as a plain forward.

Memory: the chunks' block inputs, the replayed outputs (hidden size each) and, during the stage of a
tail group, that group's inputs stay in the activation cache (``cache.py``: the compute device by default,
CPU RAM or memory-mapped files on disk with ``--offload-activations``); one chunk's intermediates are live
at a time.

Only the block being quantized sits on the compute device. Its weights come from a ``ModelWeights`` source
(``streaming.py``): a model held whole on the CPU, or a checkpoint on disk loaded block by block; a finished
block goes to the work directory (``workdir.py``) with the next block's inputs, which is what the output
writer reads and what ``--resume`` continues from.

A method with ``scope = "block"`` skips the stages: it gets the whole block (:class:`BlockGroup`) with the
chunks' inputs and the float block's outputs on them, with autograd on when it ``needs_grad``, returns one
result per linear, and the quantized block's outputs on the same inputs go on to the next block (two plain
forwards per block). Both loops live here because they share the capture, the write-in and the propagation.

What a method sees (:class:`Group`, :class:`BlockGroup`) is in ``groups.py``, the staged forward in ``stages.py``.

Several ranks (``distributed.py``): each rank runs its own share of the chunks through every stage; before a
group is solved, ``method.reduce`` makes its statistics those of every rank's chunks (identical on every rank).
Groups stay sequential (a group's inputs depend on the quantized groups before it), so the work is spread
inside a group: a ``data_parallel = "solve"`` method solves each linear of the group on one owner rank (greedy
over the cost ``rows x K^2``, GPTQ's dominant term: q_proj on one rank and k/v on another, gate and up on two;
a one-linear group such as o_proj runs on one rank while the others wait) and the owner broadcasts the
result; a ``"replicated"`` method runs its whole ``quantize`` on every rank. Every rank then writes the same
results into its block, so the propagation stays in step.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import TritonqError
from .adapters import Adapter
from .cache import ActivationCache
from .distributed import assign_owners, current_collective
from .grid import GridSpec
from .groups import BlockGroup, Chunk, Group
from .memory_peak import peak_memory, release_free_memory, reset_peak_memory
from .methods.base import LayerResult, Method
from .stages import Stage, capture_block_inputs, run_block
from .streaming import ModelWeights, as_weights
from .workdir import WorkDir


@dataclass
class QuantizeReport:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    blocks: list[dict] = field(default_factory=list)  # per block: seconds and peak host / device memory


def _swap_module(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def quantize_block(
    block: nn.Module, index: int, chunks: list[Chunk] | None, adapter: Adapter, config: Any, method: Method,
    spec: GridSpec, device: torch.device, cache: ActivationCache, report: QuantizeReport,
) -> tuple[list[Chunk] | None, float]:
    """Quantize one block (on ``device``) in place; returns the next block's inputs and the mean loss."""
    collective = current_collective()  # [distributed] the ranks of this run (world 1: one process)
    replays: dict[str, tuple[bool, list]] = {}  # sub-module -> (returns a tuple, per-chunk outputs)
    done: set[str] = set()
    # quantized linears outside every tail's parent (OPT's fc1): their outputs are recorded in the next stage
    # that runs them to the end and replayed after, so the last stage does not compute them again
    unrecorded: list[str] = []
    wrapped: list[tuple[str, nn.Module]] = []
    losses = 0.0
    float_path = None
    if method.float_targets and chunks:  # a later block-scope block fits the float path: carry it through this one
        t0 = time.perf_counter()
        float_path = [cache.keep(run_block(block, c.float_input.to(device), c.kwargs)) for c in chunks]
        report.seconds["forward"] += time.perf_counter() - t0
    for names in adapter.linear_groups:
        group_spec = group_grid(method, [f"{adapter.blocks}.{index}.{n}" for n in names], spec)
        if group_spec is None:  # left in float (a recipe's skip): nothing to observe or write
            continue
        group = Group(block, index, names, adapter, config, group_spec, device, set(done), collective)
        state = method.observe(group)
        tail = adapter.tail_of(names[0]) if chunks else None
        stage = Stage(block, group, replays, names[0] if tail else None, device, cache, tuple(unrecorded))
        if chunks and stage.events:
            t0 = time.perf_counter()
            stage.run(chunks)
            release_free_memory()  # the stage's intermediates are gone: the solve starts from what is alive
            report.seconds["forward"] += time.perf_counter() - t0 - stage.observe_seconds
            report.seconds["observe"] += stage.observe_seconds
            _keep_complete_records(stage, replays, unrecorded, len(chunks))
        t0 = time.perf_counter()
        if collective.world > 1:  # [distributed] every rank's statistics, before the solve
            state = method.reduce(state, collective)
        with torch.set_grad_enabled(method.needs_grad):
            results = _solve(method, group, state)
        losses += _write_results(method, group.label, group.linears, group.full_names, results,
                                 [group_spec] * len(names), report)
        del results, state  # the weights are in the block now; the next group's solve needs the room
        report.seconds["solve"] += time.perf_counter() - t0
        wrapped += _wrap(method, group, block, names, group.linears)
        done.update(names)
        unrecorded += [n for n in names if not any(n.startswith(t.parent + ".") for t in adapter.tails)]
        if tail is not None:  # the sub-module's output is final now: replay it from here on
            t0 = time.perf_counter()
            last, outputs = block.get_submodule(tail.linear), []
            while stage.tail_inputs:  # free each input as its output is made: the peak stays one list
                outputs.append(cache.keep(last(stage.tail_inputs.pop(0).to(device))))
                cache.page_out()
            replays[tail.parent] = (tail.returns_tuple, outputs)
            report.seconds["forward"] += time.perf_counter() - t0
    out = None
    if chunks:  # the rest of the block, replaying what is done: the next block's inputs
        t0 = time.perf_counter()
        last_stage = Stage(block, Group(block, index, (), adapter, config, spec, device, done), replays, None,
                            device, cache)
        out = last_stage.run(chunks)
        if float_path is not None:
            out = [Chunk(c.hidden, c.kwargs, reference) for c, reference in zip(out, float_path)]
        report.seconds["forward"] += time.perf_counter() - t0
    for name, original in wrapped:  # wrappers serve propagation only; the model keeps its linears
        _swap_module(block, name, original)
    return out, losses


def _solve(method: Method, group: Group, state: Any) -> list[LayerResult]:
    """``method.quantize(group, state)``; on several ranks, for a ``data_parallel = "solve"`` method, each linear
    is solved on its owner rank (``assign_owners`` over ``rows x K^2``) and broadcast from there (as CPU tensors)."""
    collective = group.collective
    if collective.world == 1 or method.data_parallel != "solve":
        return method.quantize(group, state)
    owners = assign_owners([lin.out_features * lin.in_features**2 for lin in group.linears], collective.world)
    mine = tuple(name for name, owner in zip(group.names, owners) if owner == collective.rank)
    solved: dict[str, LayerResult] = {}
    if mine:
        sub = Group(group.block, group.index, mine, group.adapter, group.config, group.spec, group.device,
                    {n for n in group.adapter.linear_names() if group.is_quantized(n)}, collective)
        for name, res in zip(mine, method.quantize(sub, state)):
            solved[name] = LayerResult(res.weight.cpu(), res.scale.cpu(), res.zero.cpu(), res.g_idx.cpu(), res.info,
                                       res.spec)
    return [collective.broadcast(solved.get(name), owner) for name, owner in zip(group.names, owners)]


def _write_results(method: Method, label: str, linears: list[nn.Linear], full_names: list[str],
                   results: list[LayerResult], specs: list[GridSpec], report: QuantizeReport) -> float:
    """Copy each result's weight into its linear and keep its grid parameters; returns the mean loss."""
    if len(results) != len(linears):
        raise TritonqError(f"method {method.name} returned {len(results)} results for the {len(linears)} "
                           f"linears of {label}")
    loss = 0.0
    for lin, full, res, spec in zip(linears, full_names, results, specs):
        lin.weight.data.copy_(res.weight.to(lin.weight.dtype))
        report.layers[full] = LayerResult(res.weight.new_empty(0), res.scale.cpu(), res.zero.cpu(),
                                          res.g_idx.cpu(), res.info, res.spec or spec)
        loss += res.info.get("loss", 0.0) / len(results)
    return loss


def _wrap(method: Method, group: Any, block: nn.Module, names: tuple[str, ...],
          linears: list[nn.Linear]) -> list[tuple[str, nn.Module]]:
    """Swap in the method's propagation wrappers; the (name, original) pairs to swap back."""
    wrapped = []
    for name, lin in zip(names, linears):
        replacement = method.wrap(group, name, lin)
        if replacement is not None:
            wrapped.append((name, _swap_module(block, name, replacement)))
    return wrapped


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Parameters of ``module`` do not require gradients inside (a block method's autograd graph stays its own)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def quantize_whole_block(
    block: nn.Module, index: int, chunks: list[Chunk] | None, adapter: Adapter, config: Any, method: Method,
    spec: GridSpec, device: torch.device, cache: ActivationCache, report: QuantizeReport, seed: int = 0,
) -> tuple[list[Chunk] | None, float]:
    """Quantize one block with a block-scope method; returns the next block's inputs and the mean loss."""
    prepass = method.block_prepass(index)
    if prepass is not None:  # its folds and weights stay in the block; its propagated outputs are not needed
        quantize_block(block, index, chunks, adapter, config, prepass, spec, device, cache, report)
    t0 = time.perf_counter()
    targets = []
    for c in chunks or []:  # the float block on the float path's inputs (float_targets) or on the quantized ones
        source = c.float_input if method.float_targets else c.hidden
        targets.append(cache.keep(run_block(block, source.to(device), c.kwargs)))
        cache.page_out()
    report.seconds["forward"] += time.perf_counter() - t0
    specs = [method.layer_grid(f"{adapter.blocks}.{index}.{n}", spec) for n in adapter.linear_names()]
    group = BlockGroup(block, index, adapter, config, specs, device, chunks or [], targets, seed)
    t0 = time.perf_counter()
    with _frozen(block), torch.set_grad_enabled(method.needs_grad):
        results = method.quantize_block(group)
    loss = _write_results(method, group.label, group.linears, group.full_names, results, group.specs, report)
    report.seconds["solve"] += time.perf_counter() - t0
    # the float outputs are the next block's float path (float_targets); otherwise freed before the propagation
    references = targets if method.float_targets else [None] * len(targets)
    del targets
    group.targets = []
    wrapped = _wrap(method, group, block, group.names, group.linears)
    out = None
    if chunks:  # the quantized block on the same inputs: the next block's inputs
        t0 = time.perf_counter()
        out = []
        for c, reference in zip(chunks, references):
            out.append(Chunk(cache.keep(run_block(block, c.hidden.to(device), c.kwargs)), c.kwargs, reference))
            cache.page_out()
        report.seconds["forward"] += time.perf_counter() - t0
    for name, original in wrapped:
        _swap_module(block, name, original)
    return out, loss


def group_grid(method: Method, full_names: list[str], spec: GridSpec) -> GridSpec | None:
    """The one grid of a linear group: the method's ``layer_grid`` of each linear, which must agree, because the
    linears of a group share their input statistics and are solved together (None: the group stays float)."""
    grids = {method.layer_grid(name, spec) for name in full_names}
    if len(grids) > 1:
        raise TritonqError(f"method {method.name} gives the linears {', '.join(full_names)} different grids; they "
                           "share one input and are quantized together, so give them one grid")
    return grids.pop()


def _keep_complete_records(stage: Stage, replays: dict, unrecorded: list[str], n_chunks: int) -> None:
    """Outputs recorded for every chunk become replays (a chunk stopped before the linear records nothing)."""
    for name, outputs in stage.recorded.items():
        if len(outputs) == n_chunks:
            replays[name] = (False, outputs)
            unrecorded.remove(name)


def quantize_blocks(
    model: nn.Module | ModelWeights,
    adapter: Adapter,
    method: Method,
    spec: GridSpec,
    device: torch.device,
    batches: list[torch.Tensor] | None,
    progress: bool = True,
    on_block: Callable[[int, float], None] | None = None,
    cache: ActivationCache | None = None,
    work: WorkDir | None = None,
    seed: int = 0,
) -> QuantizeReport:
    """Quantize every decoder block in turn; returns the grid parameters per linear.

    ``model``: a model held whole (quantized in place) or a :class:`~tritonq.engine.streaming.ModelWeights`
    source, whose blocks are loaded one at a time and released after. ``work``: a work directory that receives
    every finished block and the next block's inputs (``workdir.py``); blocks it already holds are not redone.
    ``seed``: the run's seed, for a block-scope method that draws at random (AutoRound's batch order).
    """
    if method.scope not in ("group", "block"):
        raise TritonqError(f"method {method.name} declares scope {method.scope!r}; a method's scope is 'group' "
                           "(quantize per linear group) or 'block' (quantize_block per decoder block)")
    if method.scope == "block" and type(method).quantize_block is Method.quantize_block:
        raise TritonqError(f"method {method.name} declares scope 'block' but does not define quantize_block")
    weights = as_weights(model)
    report = QuantizeReport()
    count = len(adapter.block_list(weights.model))
    cache = cache or ActivationCache("device", device)
    start = work.done if work is not None else 0
    chunks = None
    with torch.no_grad():
        if start:
            chunks = _restore(weights, adapter, work, start, batches is not None, cache, spec, report)
        elif batches:
            t0 = time.perf_counter()
            chunks = capture_block_inputs(weights, adapter, batches, device, cache)
            report.seconds["capture"] += time.perf_counter() - t0
            if work is not None:
                work.commit_inputs(0, chunks)
            cache.page_out()
        bar = tqdm(range(start, count), desc=f"{method.name} blocks", unit="block", disable=not progress,
                   initial=start, total=count)
        for i in bar:
            reset_peak_memory()
            t0 = time.perf_counter()
            prefix = f"{adapter.blocks}.{i}"
            block = weights.load(prefix, device)
            args = (block, i, chunks, adapter, weights.model.config, method, spec, device, cache, report)
            if method.block_scope(i) == "group":
                chunks, loss = quantize_block(*args)
            else:
                chunks, loss = quantize_whole_block(*args, seed=seed)
            peak = peak_memory()
            record = {"seconds": round(time.perf_counter() - t0, 3), **peak}
            report.blocks.append({"block": i, **record})
            if work is not None:
                layers = {n: report.layers[n] for n in report.layers if n.startswith(prefix + ".")}
                work.commit_block(i, block_tensors(weights, block, prefix), layers, record, chunks)
                for name, res in layers.items():  # the grids live in the work directory now, not in RAM
                    report.layers[name] = LayerResult(res.weight, torch.empty(0), torch.empty(0), torch.empty(0),
                                                      res.info, res.spec)
            weights.release(prefix)
            cache.page_out()
            release_free_memory()
            bar.set_postfix({**({"loss": f"{loss:.3g}"} if loss else {}), "rss": f"{peak['host_peak_mb']:.0f}MB"})
            if on_block is not None:
                on_block(i, loss)
    return report


def block_tensors(weights: ModelWeights, block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The block's tensors as the output stores them: full names, each in the checkpoint's dtype."""
    return {f"{prefix}.{key}": t.detach().to("cpu", weights.storage_dtype(f"{prefix}.{key}"))
            for key, t in block.state_dict().items()}


def _restore(weights: ModelWeights, adapter: Adapter, work: WorkDir, start: int, calibrated: bool,
             cache: ActivationCache, spec: GridSpec, report: QuantizeReport) -> list[Chunk] | None:
    """Resume: the finished blocks' grids into the report (a model held whole gets their weights back) and the
    inputs of block ``start`` exactly as the interrupted run left them."""
    for i in range(start):
        prefix = f"{adapter.blocks}.{i}"
        record = work.block_record(i)
        for name in record["layers"]:
            report.layers[name] = LayerResult(torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0),
                                              record["layers"][name], work.layer_spec(i, name, spec))
        report.blocks.append({"block": i, "resumed": True, **{k: v for k, v in record.items() if k != "layers"}})
        if not weights.streamed:
            block = weights.model.get_submodule(prefix)
            saved = work.block_tensors(i)
            with torch.no_grad():
                for key, t in block.state_dict().items():
                    t.copy_(saved[f"{prefix}.{key}"].to(t.dtype))
    chunks = work.inputs(start)
    if calibrated and chunks is None:
        raise TritonqError(f"--resume: {work.path} has no inputs for block {start}; the directory is incomplete, "
                           "pass --overwrite to start again")
    if chunks is not None:
        chunks = [Chunk(cache.keep(c.hidden), c.kwargs, None if c.reference is None else cache.keep(c.reference))
                  for c in chunks]
    return chunks
