"""AWRQ (Zhao et al., "AWRQ: Activation-aware Weight Reformulation Quantizer for Large Language Models",
arXiv:2306.xxxx; code linzhao-ai/AWRQ), as specified in ``../shared/docs/awq_family.md`` §6: weights fitted to
the layer's *quantized* inputs, for W4A8 (also W3A8, W4A6).

With ``X`` the float inputs (columns are tokens), ``X_q = Q_a(X)`` their dynamic activation quantization and
``E = W_hat - W``: ``|W X - W_hat X_q|^2 = tr(E H E^T) - 2 <E, W M> + const`` with ``H = X_q X_q^T`` and
``M = (X - X_q) X_q^T``. So:

1. optional smoothing (``--smooth --alpha 0.5 --min 0.01``): SmoothQuant's max|x| scales (``smoothquant.py``),
   folded into the norms, and - where the reference divides o/down inputs at run time - into the v_proj and
   up_proj rows (exact, no runtime division);
2. accumulate ``H`` and ``M`` on the group's input (the inputs of a block come from the already quantized
   blocks, activation quantization included);
3. reformulate: ``W' = W + W M H_d^-1`` (``H_d`` damped as GPTQ damps it), the least-squares fit of ``W X`` on
   ``X_q`` (:func:`reformulate`);
4. GPTQ on ``W'`` with the quantized-input Hessian ``H`` (``gptq.solve``, the shared core, no copy); the lazy
   128-column blocks equal the reference's blocksize 1 exactly.

Activations: per-tensor (per sequence) dynamic asymmetric 8-bit by default (the method's default activation
setting, ``act_quant.py``); ``--act-bits 6`` gives W4A6. Where the spec offers a choice we take its default:
grids fitted on ``W'`` (the reference fits column 0 and the first grid on ``W``; not reproduced). With an
identity activation quantizer ``M = 0``, ``W' = W`` and AWRQ is GPTQ bit for bit (tested).

Memory: with ``--smooth`` the group's raw inputs are kept until its scales are folded (``Q_a(x / s)`` is not
``Q_a(x) / s`` under a per-tensor grid), so ``H`` and ``M`` are formed after the fold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...errors import TritonqError
from ..activations import ActSpec, fake_quantize_activation
from ..hessian import HessianAccumulator, inverse_cholesky
from .base import LayerResult, Method
from .gptq import GPTQOptions, solve
from .smoothquant import SmoothPair, fold_smoothing, observe_smoothing

if TYPE_CHECKING:
    from ..distributed import Collective
    from ..groups import Group


class QuantizedInputStats:
    """Running means of ``2 x_q x_q^T`` (through the shared Hessian accumulator) and ``2 (x - x_q) x_q^T``."""

    def __init__(self, in_features: int, device: torch.device, act: ActSpec | None) -> None:
        self.act = act
        self.hessian = HessianAccumulator(in_features, device)
        self.cross = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        xq = fake_quantize_activation(x, self.act)
        before = self.hessian.tokens
        self.hessian.add(xq)
        x2d, xq2d = x.reshape(-1, x.shape[-1]).float(), xq.reshape(-1, xq.shape[-1]).float()
        n = x2d.shape[0]
        total = before + n
        # the same running-mean weighting as HessianAccumulator: cross = 2/total * sum (x - x_q) x_q^T
        self.cross.mul_(before / total)
        self.cross.addmm_((x2d - xq2d).t(), xq2d, alpha=2.0 / total)

    def reduce(self, collective: Collective) -> None:
        """Every rank's running means, merged as ``HessianAccumulator.reduce`` merges ``H`` (token-weighted, fp64,
        rank order)."""
        if collective.world == 1:
            return
        tokens = self.hessian.tokens
        total = collective.sum_count(tokens)
        self.cross = (collective.sum(self.cross.double() * tokens) / max(total, 1)).float()
        self.hessian.reduce(collective)


def reformulate(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damp: float,
                label: str) -> torch.Tensor:
    """``W' = W + (W M) H_d^-1``: the minimiser of ``|W X - W' X_q|^2 + lambda |W' - W|^2`` (``H_d`` is ``H`` with
    GPTQ's damping ``lambda = damp * mean diag H`` and dead inputs set to 1, as ``gptq.solve`` prepares it)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    factor = inverse_cholesky(h, damp, label)  # H_d^-1 = U^T U
    g = weight.float() @ cross.to(weight.device)
    u = factor.upper.to(weight.device)
    return weight.float() + (g @ u.t()) @ u


@dataclass(frozen=True)
class AWRQOptions(GPTQOptions):
    smooth: bool = field(default=False, metadata={"help": "smooth with max|x| scales before the solve (AWRQ)"})
    alpha: float = field(default=0.5, metadata={"help": "migration strength of the smoothing scales"})
    min: float = field(default=0.01, metadata={"help": "lower clamp of the smoothing scales (AWRQ: 0.01 Llama)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise TritonqError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not self.min > 0:
            raise TritonqError(f"--min must be positive, got {self.min}")


@dataclass
class AWRQState:
    smoothing: list[SmoothPair]
    inputs: list[torch.Tensor]  # raw inputs, kept only while a fold of this group's own input is pending
    stats: QuantizedInputStats


class AWRQ(Method):
    name = "awrq"
    summary = "AWRQ: least-squares reformulation onto quantized inputs, then GPTQ on their Hessian (W4A8)"
    Options = AWRQOptions
    default_act = ActSpec(bits=8, scheme="per-tensor", sym=False)
    receives_act = True  # H and M are statistics of the quantized inputs: the run's setting decides them
    data_parallel = "replicated"  # folds smoothing scales: every rank folds and solves on the same statistics

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.act: ActSpec | None = self.default_act  # the run's setting replaces it (``set_activation``)

    def set_activation(self, act: ActSpec) -> None:
        self.act = act

    def act_order_groups(self) -> str | None:
        return self.options.act_order

    def describe(self) -> dict:
        o = self.options
        return {"smooth": o.smooth, "alpha": o.alpha, "min": o.min, "act_order": o.act_order is not None,
                "act_order_groups": o.act_order, "static_groups": o.act_order == "static", "damp": o.damp,
                "block_size": o.block_size}

    def observe(self, group: Group) -> AWRQState:
        smoothing = observe_smoothing(group) if self.options.smooth else []
        own_fold = any(set(sp.pair.balance) <= set(group.names) for sp in smoothing)
        stats = QuantizedInputStats(group.linears[0].in_features, group.device, self.act)
        state = AWRQState(smoothing, [], stats)
        group.on_input(group.names[0], state.inputs.append if own_fold else stats.add)
        return state

    def reduce(self, state: AWRQState, collective: Collective) -> AWRQState:
        """The smoothing maxima and the input statistics of every rank (when the group smooths its own input, the
        statistics are gathered after the fold, in ``quantize``)."""
        for sp in state.smoothing:
            sp.observer.reduce(collective)
        state.stats.reduce(collective)
        return state

    def quantize(self, group: Group, state: AWRQState) -> list[LayerResult]:
        scales = fold_smoothing(group, state.smoothing, self.options.alpha, self.options.min)
        if state.inputs:  # this group's own input was smoothed: its statistics are of x / s
            own = next(sp.pair for sp in state.smoothing if set(sp.pair.balance) <= set(group.names))
            s = scales[own.smooth]
            while state.inputs:
                state.stats.add(state.inputs.pop(0) / s.to(group.device))
            state.stats.reduce(group.collective)  # several ranks: each added its own inputs
        if state.stats.hessian.tokens == 0:
            raise TritonqError(f"AWRQ saw no calibration tokens for {group.label}; give calibration data")
        h = state.stats.hessian.hessian
        weights = [lin.weight.data for lin in group.linears]
        stacked = torch.cat([w.float() for w in weights]).to(h.device)
        target = reformulate(stacked, h, state.stats.cross, self.options.damp, group.label)
        return solve(list(torch.split(target, [w.shape[0] for w in weights])), h, group.spec, group.full_names,
                     self.options)

