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
tail group, that group's inputs stay on ``store_device`` (the compute device by default, ``cpu`` to keep
the accelerator for the working chunk); one chunk's intermediates are live at a time.

Only the block being quantized sits on the compute device; the model stays on the CPU.

A method with ``scope = "block"`` skips the stages: it gets the whole block (:class:`BlockGroup`) with the
chunks' inputs and the float block's outputs on them, with autograd on when it ``needs_grad``, returns one
result per linear, and the quantized block's outputs on the same inputs go on to the next block (two plain
forwards per block). Both loops live here because they share the capture, the write-in and the propagation;
that is why the file runs past 400 lines.
"""

from __future__ import annotations

import sys
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
from .adapters import Adapter, ScalePair
from .grid import GridSpec
from .methods.base import LayerResult, Method

OBSERVED_ATTENTION = "tritonq_observed"  # the attention interface that calls observers, then the real one


class _StopForward(Exception):
    """Raised by a hook once a chunk has reached every observation of the stage."""


@dataclass
class Chunk:
    """Hidden states entering a block for one calibration batch, and the layer kwargs."""

    hidden: torch.Tensor
    kwargs: dict


@dataclass
class QuantizeReport:
    layers: dict[str, LayerResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


class Group:
    """One linear group of one block as a method sees it: its modules, the grid, and the observation API.

    ``names`` are relative to the block (``self_attn.q_proj``); ``full_names`` are the model's names.
    Observers receive tensors on the compute device, once per calibration chunk.
    """

    def __init__(self, block: nn.Module, index: int, names: tuple[str, ...], adapter: Adapter, config: Any,
                 spec: GridSpec, device: torch.device, done: set[str]) -> None:
        self.block = block
        self.index = index
        self.names = names
        self.full_names = [f"{adapter.blocks}.{index}.{n}" for n in names]
        self.linears: list[nn.Linear] = [block.get_submodule(n) for n in names]
        self.adapter = adapter
        self.config = config
        self.spec = spec
        self.device = device
        self._done = done  # linears of this block quantized before this group
        self.input_hooks: list[tuple[str, Callable[[torch.Tensor], None]]] = []
        self.output_hooks: list[tuple[str, Callable[[torch.Tensor, Any], None]]] = []
        self.attention_hooks: list[Callable[[torch.Tensor, torch.Tensor], None]] = []
        self.call_hooks: list[tuple[str, Callable[[tuple, dict], None]]] = []

    @property
    def label(self) -> str:
        n = len(self.full_names)
        return self.full_names[0] if n == 1 else f"{self.full_names[0]} (+{n - 1} sharing its input)"

    def on_input(self, name: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(x)`` with the first positional input of module ``name`` of the block."""
        self.block.get_submodule(name)  # a typo fails here, not silently
        self.input_hooks.append((name, fn))

    def on_output(self, name: str, fn: Callable[[torch.Tensor, Any], None]) -> None:
        """Call ``fn(x, output)`` with the input and the output of module ``name`` of the block."""
        self.block.get_submodule(name)
        self.output_hooks.append((name, fn))

    def on_call(self, name: str, fn: Callable[[tuple, dict], None]) -> None:
        """Call ``fn(args, kwargs)`` with the whole call of module ``name`` (positional and keyword arguments,
        e.g. the attention's hidden states, position embeddings and mask), before it runs: enough to call the
        module again later, as AWQ does to score candidate scales on the module's output."""
        self.block.get_submodule(name)
        self.call_hooks.append((name, fn))

    def is_quantized(self, name: str) -> bool:
        """Whether linear ``name`` of this block was quantized by an earlier group (a fold into it is refused)."""
        return name in self._done

    def on_attention(self, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Call ``fn(query, key)`` with the attention's queries [B, heads, T, D] and keys [B, kv_heads, T, D]
        after the rotary embedding (before grouped-query repetition)."""
        self.attention_hooks.append(fn)

    def fold(self, pair: ScalePair, scale: torch.Tensor) -> None:
        """Divide ``pair.smooth``'s output channels by ``scale`` and multiply the balance linears' input
        columns by it: the float block computes the same function (up to rounding)."""
        touched = [pair.smooth, *pair.balance]
        late = [n for n in touched if n in self._done]
        if late:
            raise TritonqError(f"cannot fold a scale into {late[0]} of block {self.index}: it is already quantized; "
                               "fold before the group that holds it is quantized")
        fold_scale(self.block, pair, scale)


def fold_scale(block: nn.Module, pair: ScalePair, scale: torch.Tensor) -> None:
    """Apply ``smooth.out /= s`` and ``balance.in *= s`` in place (norm weight and bias, or linear rows),
    computing in at least fp32 and rounding once to each parameter's dtype."""

    def rescale(param: torch.Tensor, factor: torch.Tensor, divide: bool) -> None:
        work = torch.promote_types(param.dtype, torch.float32)
        f = factor.to(device=param.device, dtype=work)
        value = param.to(work) / f if divide else param.to(work) * f
        param.copy_(value.to(param.dtype))

    smooth = block.get_submodule(pair.smooth)
    with torch.no_grad():
        # a linear's output channels are its rows; a norm's are its affine weight (RMSNorm, LayerNorm)
        rescale(smooth.weight, scale[:, None] if isinstance(smooth, nn.Linear) else scale, divide=True)
        if getattr(smooth, "bias", None) is not None:
            rescale(smooth.bias, scale, divide=True)
        for name in pair.balance:
            rescale(block.get_submodule(name).weight, scale[None, :], divide=False)


def capture_block_inputs(
    model: nn.Module, adapter: Adapter, batches: list[torch.Tensor], device: torch.device,
    store_device: torch.device | None = None,
) -> list[Chunk]:
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
    chunks: list[Chunk] = []
    store = store_device or device

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        chunks.append(Chunk(hidden.to(store), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
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
    return chunks


def _observed_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention interface used while a method observes queries and keys: observers, then the real one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for fn in module._tritonq_observers:
        fn(query, key)
    inner = module._tritonq_inner
    if inner == "eager":  # the model file's own eager function is the default of get_interface
        eager = sys.modules[type(module).__module__].eager_attention_forward
        real = eager
    else:
        real = ALL_ATTENTION_FUNCTIONS.get_interface(inner, None)
    return real(module, query, key, value, attention_mask, **kwargs)


class _Stage:
    """One stage of a block: hooks that stop every chunk after its last observation, and the replays.

    A stage with no observations runs every chunk to the end of the block and returns the outputs.
    """

    def __init__(self, block: nn.Module, group: Group, replays: dict[str, tuple[bool, list]],
                 tail_input: str | None, device: torch.device, store: torch.device,
                 record: tuple[str, ...] = ()) -> None:
        self.block, self.group, self.replays, self.device, self.store = block, group, replays, device, store
        self.recorded: dict[str, list[torch.Tensor]] = {name: [] for name in record}  # outputs of done linears
        self.tail_input = tail_input  # save the inputs of this linear (a tail) for its replay
        self.tail_inputs: list[torch.Tensor] = []
        self.events = (len(group.input_hooks) + len(group.output_hooks) + len(group.call_hooks)
                       + bool(group.attention_hooks) + (tail_input is not None))
        self.fired = 0
        self.chunk = 0
        self.observe_seconds = 0.0

    def _call(self, fn: Callable, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self.observe_seconds += time.perf_counter() - t0
        self.fired += 1
        if self.fired == self.events:
            raise _StopForward

    def _attention(self, query: torch.Tensor, key: torch.Tensor) -> None:
        for fn in self.group.attention_hooks:
            fn(query, key)

    def _install(self) -> Callable[[], None]:
        """Register hooks and replays; returns the function that removes them."""
        group, handles, patched = self.group, [], []
        for name, fn in group.input_hooks:
            handles.append(self.block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, fn=fn: self._call(fn, args[0])))
        for name, fn in group.call_hooks:
            handles.append(self.block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, kwargs, fn=fn: self._call(fn, args, kwargs), with_kwargs=True))
        for name, fn in group.output_hooks:
            handles.append(self.block.get_submodule(name).register_forward_hook(
                lambda _m, args, out, fn=fn: self._call(fn, args[0] if args else None, out)))
        if self.tail_input is not None:
            handles.append(self.block.get_submodule(self.tail_input).register_forward_pre_hook(
                lambda _m, args: self._call(self.tail_inputs.append, args[0].to(self.store))))
        for name, outputs in self.recorded.items():
            handles.append(self.block.get_submodule(name).register_forward_hook(
                lambda _m, _args, out, outputs=outputs: outputs.append(out.to(self.store))))
        attention = None
        if group.attention_hooks:
            attention = self.block.get_submodule(group.adapter.attention)
            attention._tritonq_observers = [lambda q, k: self._call(self._attention, q, k)]
            attention._tritonq_inner = attention.config._attn_implementation
            _register_observed_attention()
            attention.config._attn_implementation = OBSERVED_ATTENTION
        for parent, (as_tuple, outputs) in self.replays.items():
            module = self.block.get_submodule(parent)
            module.forward = self._replayer(outputs, as_tuple)
            patched.append(module)

        def remove() -> None:
            for h in handles:
                h.remove()
            for module in patched:
                del module.forward
            if attention is not None:
                attention.config._attn_implementation = attention._tritonq_inner
                del attention._tritonq_observers, attention._tritonq_inner
        return remove

    def run(self, chunks: list[Chunk]) -> list[Chunk]:
        """Run every chunk as far as the observations need; the outputs of chunks that ran to the end."""
        outputs = []
        remove = self._install()
        try:
            for c, chunk in enumerate(chunks):
                self.chunk, self.fired = c, 0
                try:
                    out = _run_block(self.block, chunk.hidden.to(self.device), chunk.kwargs)
                    outputs.append(Chunk(out.to(self.store), chunk.kwargs))
                except _StopForward:
                    continue
                if self.events:
                    raise TritonqError(
                        f"{self.events - self.fired} observation(s) of {self.group.label} never fired in block "
                        f"{self.group.index}: they watch a module that does not run at this stage (inside a "
                        "sub-module already replayed from its cached output); observe it from an earlier group")
        finally:
            remove()
        return outputs

    def _replayer(self, outputs: list[torch.Tensor], as_tuple: bool) -> Callable:
        def forward(*_args, **_kwargs):
            out = outputs[self.chunk].to(self.device)
            return (out, None) if as_tuple else out
        return forward


def _register_observed_attention() -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(OBSERVED_ATTENTION, _observed_attention)


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _swap_module(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = getattr(parent, child)
    setattr(parent, child, module)
    return old


def quantize_block(
    block: nn.Module, index: int, chunks: list[Chunk] | None, adapter: Adapter, config: Any, method: Method,
    spec: GridSpec, device: torch.device, store: torch.device, report: QuantizeReport,
) -> tuple[list[Chunk] | None, float]:
    """Quantize one block (on ``device``) in place; returns the next block's inputs and the mean loss."""
    replays: dict[str, tuple[bool, list]] = {}  # sub-module -> (returns a tuple, per-chunk outputs)
    done: set[str] = set()
    # quantized linears outside every tail's parent (OPT's fc1): their outputs are recorded in the next stage
    # that runs them to the end and replayed after, so the last stage does not compute them again
    unrecorded: list[str] = []
    wrapped: list[tuple[str, nn.Module]] = []
    losses = 0.0
    for names in adapter.linear_groups:
        group_spec = group_grid(method, [f"{adapter.blocks}.{index}.{n}" for n in names], spec)
        group = Group(block, index, names, adapter, config, group_spec, device, set(done))
        state = method.observe(group)
        tail = adapter.tail_of(names[0]) if chunks else None
        stage = _Stage(block, group, replays, names[0] if tail else None, device, store, tuple(unrecorded))
        if chunks and stage.events:
            t0 = time.perf_counter()
            stage.run(chunks)
            report.seconds["forward"] += time.perf_counter() - t0 - stage.observe_seconds
            report.seconds["observe"] += stage.observe_seconds
            _keep_complete_records(stage, replays, unrecorded, len(chunks))
        t0 = time.perf_counter()
        with torch.set_grad_enabled(method.needs_grad):
            results = method.quantize(group, state)
        losses += _write_results(method, group.label, group.linears, group.full_names, results,
                                 [group_spec] * len(names), report)
        report.seconds["solve"] += time.perf_counter() - t0
        wrapped += _wrap(method, group, block, names, group.linears)
        done.update(names)
        unrecorded += [n for n in names if not any(n.startswith(t.parent + ".") for t in adapter.tails)]
        if tail is not None:  # the sub-module's output is final now: replay it from here on
            t0 = time.perf_counter()
            last, outputs = block.get_submodule(tail.linear), []
            while stage.tail_inputs:  # free each input as its output is made: the peak stays one list
                outputs.append(last(stage.tail_inputs.pop(0).to(device)).to(store))
            replays[tail.parent] = (tail.returns_tuple, outputs)
            report.seconds["forward"] += time.perf_counter() - t0
    out = None
    if chunks:  # the rest of the block, replaying what is done: the next block's inputs
        t0 = time.perf_counter()
        last_stage = _Stage(block, Group(block, index, (), adapter, config, spec, device, done), replays, None,
                            device, store)
        out = last_stage.run(chunks)
        report.seconds["forward"] += time.perf_counter() - t0
    for name, original in wrapped:  # wrappers serve propagation only; the model keeps its linears
        _swap_module(block, name, original)
    return out, losses


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


class BlockGroup:
    """A whole decoder block as a ``scope = "block"`` method sees it, e.g. a method that tunes the rounding of
    every linear against the block's output with gradients (AutoRound: Cheng et al., "Optimize Weight Rounding
    via Signed Gradient Descent for the Quantization of LLMs", arXiv:2309.05516).

    ``names`` are every linear of the block in ``adapter.linear_names()`` order (``full_names`` the model's
    names, ``specs`` their grids); ``inputs`` are the calibration chunks entering the block (the quantized
    blocks before it upstream) and ``targets`` the float block's output on each chunk, both on the store
    device. The block's own parameters do not require gradients while the method runs: it makes its own
    leaves and replays the block with them through ``run``.
    """

    def __init__(self, block: nn.Module, index: int, adapter: Adapter, config: Any, method: Method, spec: GridSpec,
                 device: torch.device, inputs: list[Chunk], targets: list[torch.Tensor]) -> None:
        self.block = block
        self.index = index
        self.names = tuple(adapter.linear_names())
        self.full_names = [f"{adapter.blocks}.{index}.{n}" for n in self.names]
        self.linears: list[nn.Linear] = [block.get_submodule(n) for n in self.names]
        self.specs = [method.layer_grid(name, spec) for name in self.full_names]
        self.adapter = adapter
        self.config = config
        self.device = device
        self.inputs = inputs
        self.targets = targets

    @property
    def label(self) -> str:
        return f"block {self.index} ({len(self.names)} linears)"

    def run(self, chunk: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output [B, T, hidden] on input chunk ``chunk``, on the compute device, with ``weights``
        (linear name -> [N, K]) in place of those linears' own weights; differentiable in them."""
        c = self.inputs[chunk]
        params = {f"{name}.weight": w for name, w in (weights or {}).items()}
        out = torch.func.functional_call(self.block, params, (c.hidden.to(self.device),), c.kwargs)
        return out[0] if isinstance(out, tuple) else out


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
    spec: GridSpec, device: torch.device, store: torch.device, report: QuantizeReport,
) -> tuple[list[Chunk] | None, float]:
    """Quantize one block with a block-scope method; returns the next block's inputs and the mean loss."""
    t0 = time.perf_counter()
    targets = [_run_block(block, c.hidden.to(device), c.kwargs).to(store) for c in chunks or []]
    report.seconds["forward"] += time.perf_counter() - t0
    group = BlockGroup(block, index, adapter, config, method, spec, device, chunks or [], targets)
    t0 = time.perf_counter()
    with _frozen(block), torch.set_grad_enabled(method.needs_grad):
        results = method.quantize_block(group)
    loss = _write_results(method, group.label, group.linears, group.full_names, results, group.specs, report)
    report.seconds["solve"] += time.perf_counter() - t0
    del targets
    group.targets = []  # free the float outputs before the propagation
    wrapped = _wrap(method, group, block, group.names, group.linears)
    out = None
    if chunks:  # the quantized block on the same inputs: the next block's inputs
        t0 = time.perf_counter()
        out = [Chunk(_run_block(block, c.hidden.to(device), c.kwargs).to(store), c.kwargs) for c in chunks]
        report.seconds["forward"] += time.perf_counter() - t0
    for name, original in wrapped:
        _swap_module(block, name, original)
    return out, loss


def group_grid(method: Method, full_names: list[str], spec: GridSpec) -> GridSpec:
    """The one grid of a linear group: the method's ``layer_grid`` of each linear, which must agree, because the
    linears of a group share their input statistics and are solved together."""
    grids = {method.layer_grid(name, spec) for name in full_names}
    if len(grids) > 1:
        raise TritonqError(f"method {method.name} gives the linears {', '.join(full_names)} different grids; they "
                           "share one input and are quantized together, so give them one grid")
    return grids.pop()


def _keep_complete_records(stage: _Stage, replays: dict, unrecorded: list[str], n_chunks: int) -> None:
    """Outputs recorded for every chunk become replays (a chunk stopped before the linear records nothing)."""
    for name, outputs in stage.recorded.items():
        if len(outputs) == n_chunks:
            replays[name] = (False, outputs)
            unrecorded.remove(name)


def quantize_blocks(
    model: nn.Module,
    adapter: Adapter,
    method: Method,
    spec: GridSpec,
    device: torch.device,
    batches: list[torch.Tensor] | None,
    progress: bool = True,
    on_block: Callable[[int, float], None] | None = None,
    store_device: torch.device | None = None,
) -> QuantizeReport:
    """Quantize every decoder block of ``model`` in place; returns the grid parameters per linear."""
    if method.scope not in ("group", "block"):
        raise TritonqError(f"method {method.name} declares scope {method.scope!r}; a method's scope is 'group' "
                           "(quantize per linear group) or 'block' (quantize_block per decoder block)")
    if method.scope == "block" and type(method).quantize_block is Method.quantize_block:
        raise TritonqError(f"method {method.name} declares scope 'block' but does not define quantize_block")
    step = quantize_block if method.scope == "group" else quantize_whole_block
    report = QuantizeReport()
    blocks = adapter.block_list(model)
    store = store_device or device
    chunks = None
    with torch.no_grad():
        if batches:
            t0 = time.perf_counter()
            chunks = capture_block_inputs(model, adapter, batches, device, store)
            report.seconds["capture"] += time.perf_counter() - t0
        bar = tqdm(range(len(blocks)), desc=f"{method.name} blocks", unit="block", disable=not progress)
        for i in bar:
            block = blocks[i].to(device)
            chunks, loss = step(block, i, chunks, adapter, model.config, method, spec, device, store, report)
            blocks[i] = block.to("cpu")
            if loss:
                bar.set_postfix(loss=f"{loss:.3g}")
            if on_block is not None:
                on_block(i, loss)
    return report
