"""Input-sharing linears fused into one CPU int4 matmul at load: q/k/v, and gate/up.

The adapters already declare which linears of a block read the same input (``Adapter.linear_groups``, the
groups GPTQ shares a Hessian over). On the CPU decode op each call quantizes its input and spins up the
thread pool, and a 256-row k or v projection gives two threads little to share; one call over the
concatenated rows does each of those once. The op computes every output row from its own 16-row block, so
the fused result is bit-for-bit the three separate ones (tested).

The model's code still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``: each becomes a
:class:`FusedMember` that returns its slice of :class:`SharedGemm`'s output for ``x``. The shared result is
kept, with a reference to ``x`` (so that ``x`` is not freed and its identity reused), until every member has
read it; a member called on another input recomputes, so the output is always its own linear of its input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ...kernels import cpu_gemv
from .qlinear import QuantLinear


class SharedGemm(nn.Module):
    """The concatenated packed rows of a group of int4 linears, computed once per input."""

    def __init__(self, members: list[QuantLinear]) -> None:
        super().__init__()
        first = members[0]
        self.in_features, self.group_size, self.members = first.in_features, first.cpu_group_size, len(members)
        self.register_buffer("rows_weight", torch.cat([m.rows_weight for m in members]))
        self.register_buffer("rows_scale", torch.cat([m.rows_scale for m in members]))
        self.register_buffer("rows_min", torch.cat([m.rows_min for m in members]))
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in members]
        has_bias = any(m.bias is not None for m in members)
        self.register_buffer("bias", torch.cat([b.float() for b in biases]) if has_bias else None)
        # [input, output, members yet to read it]: one list mutated in place, because nn.Module.__setattr__
        # costs microseconds per assignment, and this runs several times per layer and token
        self._last: list = [None, None, 0]

    def compute(self, x: Tensor) -> Tensor:
        """Every member's output for ``x``, concatenated (float32), without keeping it."""
        if self.rows_scale.dtype != torch.float16:  # a later model.to(dtype) converted the buffers
            self.rows_scale, self.rows_min = self.rows_scale.half(), self.rows_min.half()
        return cpu_gemv.int4_linear(x, self.rows_weight, self.rows_scale, self.rows_min, self.group_size, self.bias)

    def output(self, x: Tensor) -> Tensor:
        last = self._last
        if last[0] is not x or last[2] == 0:
            last[:] = [x, self.compute(x).to(x.dtype), self.members]
        out = last[1]
        last[2] -= 1
        if last[2] == 0:
            last[0] = last[1] = None  # every member has its slice: hold nothing between steps
        return out


class FusedMember(nn.Module):
    """One linear of a fused group: its rows ``[start, stop)`` of the shared output."""

    def __init__(self, shared: SharedGemm, start: int, stop: int) -> None:
        super().__init__()
        self.in_features, self.out_features = shared.in_features, stop - start
        self.start, self.stop = start, stop
        object.__setattr__(self, "shared", shared)  # not a submodule: the group's block owns it once

    def forward(self, x: Tensor) -> Tensor:
        return self.shared.output(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused int4 matmul"


def _fusable(members: list[nn.Module]) -> bool:
    if len(members) < 2 or not all(isinstance(m, QuantLinear) and m.cpu_kernel == "tritonq" for m in members):
        return False
    first = members[0]
    return all(m.in_features == first.in_features and m.cpu_group_size == first.cpu_group_size
               and m.input_order is None for m in members)


def fuse_input_sharing_linears(model: nn.Module) -> int:
    """Fuse every input-sharing group of int4 linears on tritonq's CPU op (see the module docstring); returns
    how many groups were fused. Groups with act-order permutations or mixed group sizes stay separate."""
    from ..adapters import adapter_for

    try:
        adapter = adapter_for(model.config)
    except Exception:
        return 0  # an architecture without an adapter: nothing is known to share an input
    fused = 0
    for block in adapter.block_list(model):
        for g, names in enumerate(adapter.linear_groups):
            members = [block.get_submodule(n) for n in names]
            if not _fusable(members):
                continue
            shared = SharedGemm(members)
            block.add_module(f"tritonq_fused_{g}", shared)
            start = 0
            for name, member in zip(names, members):
                parent, _, leaf = name.rpartition(".")
                owner = block.get_submodule(parent) if parent else block
                setattr(owner, leaf, FusedMember(shared, start, start + member.out_features))
                start += member.out_features
            fused += 1
    return fused
