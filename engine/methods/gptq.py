"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, arXiv:2210.17323), following ``../shared/docs/awq_family.md`` §2:

1. dead inputs (``H_jj = 0``): ``H_jj = 1`` and ``W[:, j] = 0``;
2. act-order: columns by decreasing ``diag(H)``; ``static`` groups (the default of ``--act-order``):
   every group's grid is fitted up front on the unpermuted columns, so column ``j`` keeps group ``j // g``
   and ``g_idx`` stays trivial; ``dynamic`` groups (GPTQModel's ``desc_act`` without static groups):
   groups are runs of ``g`` columns in the permuted order, fitted when they start, and ``g_idx`` records
   them (kernels then gather scales per input row);
3. damping ``H += damp * mean(diag H) * I`` (retried with more damping on Cholesky failure);
4. ``U = chol(H^-1)^T`` (upper), then blocked quantization with lazy trailing updates (128 columns),
   grids fitted from the up-to-date working tile at every group start (our default; the reference fits
   the second group of a 128-block on stale values when ``g = 64``).

The linears of a group share one Hessian, so their rows are stacked and solved at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...errors import TritonqError
from ..grid import default_g_idx, fit_groups
from ..hessian import (
    HessianAccumulator,
    blocked_quantize,
    check_block_size,
    check_finite,
    inverse_cholesky_reversed,
)
from .base import LayerResult, Method, split_rows

if TYPE_CHECKING:
    from ..distributed import Collective
    from ..groups import Group

ACT_ORDERS = (None, "static", "dynamic")


@dataclass(frozen=True)
class GPTQOptions:
    # defaults chosen on calibration-side evidence (held-out pydoc, and a second corpus), bench/RESULTS.md
    act_order: str | None = field(default="static", metadata={
        "help": "columns by decreasing Hessian diagonal: static (grids fixed before reordering, trivial g_idx) "
                "or dynamic (groups in permuted order, g_idx recorded); 'none' for the original order",
        "choices": ("none", "static", "dynamic"), "const": "static"})
    damp: float = field(default=0.1, metadata={"help": "damping, a fraction of the mean Hessian diagonal"})
    block_size: int = field(default=128, metadata={"help": "lazy-update block width (columns)"})

    def __post_init__(self) -> None:
        if self.act_order == "none":
            object.__setattr__(self, "act_order", None)
        if self.act_order not in ACT_ORDERS:
            raise TritonqError(f"act-order must be none, static or dynamic, got {self.act_order!r}")
        if not 0 < self.damp < 10:
            raise TritonqError(f"--damp must be in (0, 10), got {self.damp}")
        check_block_size(self.block_size)


class GPTQ(Method):
    name = "gptq"
    summary = "GPTQ: second-order error feedback through the inverse Hessian (Frantar et al. 2023)"
    Options = GPTQOptions
    data_parallel = "solve"  # a pure function of the reduced Hessian and the weights, rows independent

    def observe(self, group: Group) -> HessianAccumulator:
        acc = HessianAccumulator(group.linears[0].in_features, group.device, group.collective)
        group.on_input(group.names[0], acc.add)  # the linears of a group share their input
        return acc

    def reduce(self, state: HessianAccumulator, collective: Collective) -> HessianAccumulator:
        state.reduce(collective)
        return state

    def act_order_groups(self) -> str | None:
        return self.options.act_order

    def describe(self) -> dict:
        act_order = self.options.act_order
        return {"act_order": act_order is not None, "act_order_groups": act_order,
                "static_groups": act_order == "static", "damp": self.options.damp,
                "block_size": self.options.block_size}

    def quantize(self, group: Group, state: HessianAccumulator, force: str | None = None) -> list[LayerResult]:
        if state.tokens == 0:
            raise TritonqError(f"GPTQ saw no calibration tokens for {group.label}; give calibration data")
        weights = [lin.weight.data for lin in group.linears]
        return solve(weights, state.take(), group.spec, group.full_names, self.options, force=force)


def solve(weights: list[torch.Tensor], hessian: torch.Tensor, spec, names: list[str], options: GPTQOptions,
          force: str | None = None) -> list[LayerResult]:
    """GPTQ of linears sharing one input (rows stacked), following the steps of the module docstring."""
    label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} sharing its input)"
    check_finite(hessian, label)
    w = torch.cat([x.float() for x in weights], dim=0).to(hessian.device)
    k = w.shape[1]
    for name in names:
        spec.groups_for(k, name)
    dead = torch.diag(hessian) == 0
    diag = torch.diag(hessian).clone()
    diag[dead] = 1.0
    w[:, dead] = 0.0

    act_order = options.act_order
    g_idx = default_g_idx(k, spec).to(w.device)
    preset = None
    if spec.group_size == -1 or act_order == "static":
        # per-row grids, and static groups, are fitted on the original (unpermuted) weights
        preset = fit_groups(w, spec, label)

    # the working Hessian is one K x K matrix, gathered permuted (act-order) and reversed (the factorisation's
    # order, hessian.py) at once; dead inputs get H_jj = 1 in it (the order comes from the diagonal with that fix)
    perm = None
    work_g_idx = g_idx
    if act_order:
        perm = torch.argsort(diag, descending=True)
        w = w[:, perm]
        if act_order == "static":
            work_g_idx = g_idx[perm]
        else:  # dynamic: groups are runs of g columns in the new order; g_idx records them
            g_idx = torch.empty_like(g_idx)
            g_idx[perm] = work_g_idx
        reverse = perm.flip(0)
        reversed_h = hessian[reverse[:, None], reverse]
        dead = dead[reverse]
    else:
        reversed_h = hessian.flip(0, 1)
        dead = dead.flip(0)
    del hessian  # the accumulator's, when the caller handed it over (HessianAccumulator.take): freed here
    reversed_h[dead, dead] = 1.0
    box = [reversed_h]  # handed over with no name left here, so the factorisation can free it once factored
    del reversed_h
    factor = inverse_cholesky_reversed(box.pop(), options.damp, label)
    res = blocked_quantize(w, factor.upper, spec, work_g_idx, options.block_size, preset, force=force)
    q = res.weight
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    info = {"loss": res.loss, "damp": factor.damp}
    out = []
    for qw, s, z in zip(split_rows(q, weights), split_rows(res.scale, weights), split_rows(res.zero, weights)):
        out.append(LayerResult(qw, s, z, g_idx, dict(info)))
    return out
