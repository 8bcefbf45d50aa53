"""What a method sees of a block: a linear group with its observation API (:class:`Group`), a whole block
(:class:`BlockGroup`), the calibration chunks, and the scale fold through a declared pair.

These live apart from the layer loop (``pipeline.py``) so that methods depend on them and not on the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import TritonqError
from .adapters import Adapter, ScalePair
from .distributed import SINGLE, Collective
from .grid import GridSpec


@dataclass
class Chunk:
    """Hidden states entering a block for one calibration batch, and the layer kwargs. ``reference``: the float
    model's own hidden states for the same windows (the float path), kept only for a block-scope method that
    declares ``float_targets``; None means the same as ``hidden`` (block 0) or not kept."""

    hidden: torch.Tensor
    kwargs: dict
    reference: torch.Tensor | None = None

    @property
    def float_input(self) -> torch.Tensor:
        """The float model's hidden states for these windows: ``reference``, or ``hidden`` where none is kept."""
        return self.hidden if self.reference is None else self.reference


class Group:
    """One linear group of one block as a method sees it: its modules, the grid, and the observation API.

    ``names`` are relative to the block (``self_attn.q_proj``); ``full_names`` are the model's names.
    Observers receive tensors on the compute device, once per calibration chunk (this rank's chunks when
    several ranks run: ``collective``, see ``engine/distributed.py``).
    """

    def __init__(self, block: nn.Module, index: int, names: tuple[str, ...], adapter: Adapter, config: Any,
                 spec: GridSpec, device: torch.device, done: set[str], collective: Collective = SINGLE) -> None:
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
        self.collective = collective
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


class BlockGroup:
    """A whole decoder block as a ``scope = "block"`` method sees it, e.g. a method that tunes the rounding of
    every linear against the block's output with gradients (AutoRound: Cheng et al., "Optimize Weight Rounding
    via Signed Gradient Descent for the Quantization of LLMs", arXiv:2309.05516).

    ``names`` are every linear of the block in ``adapter.linear_names()`` order (``full_names`` the model's
    names, ``specs`` their grids); ``inputs`` are the calibration chunks entering the block (the quantized
    blocks before it upstream) and ``targets`` the float block's output on each chunk (on the quantized path's
    inputs, or on the float path's when the method declares ``float_targets``), both on the store device. The
    block's own parameters do not require gradients while the method runs: it makes its own leaves and replays
    the block with them through ``run`` or ``call``. ``seed`` is the run's ``--seed``, for a method that draws
    at random.
    """

    def __init__(self, block: nn.Module, index: int, adapter: Adapter, config: Any, specs: list[GridSpec],
                 device: torch.device, inputs: list[Chunk], targets: list[torch.Tensor], seed: int = 0) -> None:
        self.block = block
        self.index = index
        self.names = tuple(adapter.linear_names())
        self.full_names = [f"{adapter.blocks}.{index}.{n}" for n in self.names]
        self.linears: list[nn.Linear] = [block.get_submodule(n) for n in self.names]
        self.specs = specs
        self.adapter = adapter
        self.config = config
        self.device = device
        self.inputs = inputs
        self.targets = targets
        self.seed = seed

    @property
    def label(self) -> str:
        return f"block {self.index} ({len(self.names)} linears)"

    def run(self, chunk: int, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output [B, T, hidden] on input chunk ``chunk``, on the compute device, with ``weights``
        (linear name -> [N, K]) in place of those linears' own weights; differentiable in them."""
        c = self.inputs[chunk]
        return self.call(c.hidden.to(self.device), c.kwargs, weights)

    def call(self, hidden: torch.Tensor, kwargs: dict, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output on ``hidden`` (a batch of windows on the compute device, with its keyword inputs),
        with ``weights`` in place of those linears' own, as :meth:`run`."""
        return block_forward(self.block, hidden, kwargs, weights)


def block_forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict,
                  weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``block``'s output on ``hidden`` with ``weights`` (linear name -> [N, K]) in place of those linears' own.
    A free function, so that a method can ``torch.compile`` it once and call it on every block (the block module
    is an argument, not a captured object, so the compiled graph is reused rather than rebuilt per block)."""
    params = {f"{name}.weight": w for name, w in (weights or {}).items()}
    out = torch.func.functional_call(block, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out
