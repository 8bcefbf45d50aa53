"""The staged forward: capture what enters block 0, and run the calibration chunks through a block only as far
as a group's observations need, replaying the sub-modules already quantized from their cached outputs.

``pipeline.py`` drives it; the staging rules are in that module's docstring.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn

from ..errors import TritonqError
from .adapters import Adapter
from .cache import ActivationCache
from .groups import Chunk, Group
from .streaming import ModelWeights, as_weights

OBSERVED_ATTENTION = "tritonq_observed"  # the attention interface that calls observers, then the real one


class StopForward(Exception):
    """Raised by a hook once a chunk has reached every observation of the stage."""


def capture_block_inputs(
    weights: ModelWeights | nn.Module, adapter: Adapter, batches: list[torch.Tensor], device: torch.device,
    cache: ActivationCache | None = None,
) -> list[Chunk]:
    """Run the embeddings on ``device`` and record what enters block 0 (hidden states and kwargs)."""
    weights = as_weights(weights)
    cache = cache or ActivationCache("device", device)
    model = weights.model
    blocks = adapter.block_list(model)
    loaded = []
    for name in adapter.embeddings:
        try:
            model.get_submodule(name)
        except AttributeError:
            continue  # optional module absent in this variant (e.g. OPT's project_in)
        weights.load(name, device)
        loaded.append(name)
    chunks: list[Chunk] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        chunks.append(Chunk(cache.keep(hidden), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise StopForward

    # block 0 stops every batch before it computes anything: its weights are not needed (nor loaded)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        for name in loaded:
            weights.release(name)
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


class Stage:
    """One stage of a block: hooks that stop every chunk after its last observation, and the replays.

    A stage with no observations runs every chunk to the end of the block and returns the outputs.
    """

    def __init__(self, block: nn.Module, group: Group, replays: dict[str, tuple[bool, list]],
                 tail_input: str | None, device: torch.device, cache: ActivationCache,
                 record: tuple[str, ...] = ()) -> None:
        self.block, self.group, self.replays, self.device, self.cache = block, group, replays, device, cache
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
            raise StopForward

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
        if self.tail_input is not None:  # the tail's own input, before any input transform of its own (prepended:
            # engine/online_hadamard.py's pre-hook runs after it), since the replay calls the tail again on it
            handles.append(self.block.get_submodule(self.tail_input).register_forward_pre_hook(
                lambda _m, args: self._call(self.tail_inputs.append, self.cache.keep(args[0])), prepend=True))
        for name, outputs in self.recorded.items():
            handles.append(self.block.get_submodule(name).register_forward_hook(
                lambda _m, _args, out, outputs=outputs: outputs.append(self.cache.keep(out))))
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
                    out = run_block(self.block, chunk.hidden.to(self.device), chunk.kwargs)
                    outputs.append(Chunk(self.cache.keep(out), chunk.kwargs))
                except StopForward:
                    continue
                finally:
                    self.cache.page_out()
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


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out
