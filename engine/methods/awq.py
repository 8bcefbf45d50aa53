"""AWQ: activation-aware scales searched on a grid, folded into the producers, then clip search and rounding.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024
(arXiv:2306.00978), as specified in ``../shared/docs/awq_family.md`` §3 (llm-awq / AutoAWQ) with the llmc
variants of §3.3-3.4 (seed 002: asymmetric clipping, scale formula version 2). This file is the method
(options, which pairs a group owns, search -> fold -> clip -> round) and AWQ+GPTQ; the steps live beside it,
split as llm-awq splits ``auto_scale`` and ``auto_clip``, and A-BoA, DH-AWQ and AWQ+GPTQ reuse them:

* :mod:`.awq_observe` - :class:`PairObserver` (``mean |x|`` per input channel over all tokens, plus a token
  sample to score candidates on) and :class:`GramObserver` (the clip error's Gram blocks);
* :mod:`.awq_scale` - the scale formula (version 1: AutoAWQ's "duo" scaling ``x^a / w^(1-a)``; version 2:
  llm-awq/llmc's ``x^a``) and the search: loss on the parent module's output (self_attn for q/k/v, mlp for
  gate/up) or on one linear's output, on Triton for every pair on a GPU;
* :mod:`.awq_clip` - per output row and group, shrink factors 1.0 .. 0.55, error ``d^T H_g d`` on the group's
  diagonal Gram block (the exact Gram form of §3.4), one kernel launch on a GPU;
* folding is the pipeline's :meth:`Group.fold` (``smooth.out /= s``, ``balance.in *= s``).

How it runs in tritonq's one-pass pipeline (``pipeline.py``): groups are quantized in the adapter's order
(q/k/v, o, gate/up, down) and a fold into an already quantized linear is refused. So each group handles the
scale pairs whose balance linears are its own (norm -> q/k/v, norm -> gate/up) *and* the pairs whose
smooth linear is its own (v -> o from the q/k/v group, up -> down from the gate/up group): the balance
linear's input is observed in the same stage, where it is computed from the float producers (the stage
runs past the group's own linears until that observation fires), searched and folded before the producer
is rounded. Clipping and rounding of every group happen in its own ``quantize``, on inputs that already
carry the scale (for the norm pairs the Gram of ``x / s`` is the Gram of ``x`` rescaled exactly). Inputs to
later groups come from the quantized earlier ones (the pipeline's true-sequential propagation), not from
the float block as in llm-awq (§0.3); the candidates of each search are still scored against the float
output of the module on the same inputs.

Our choices where the sources differ (the spec's defaults unless said): duo scaling, 20 ratios
``{0, .., 0.95}``; clip follows the grid (asymmetric grid -> asymmetric clip, llmc), ``--clip-sym`` for
AutoAWQ's symmetric clip; the clip error uses every calibration token in Gram form (as cheap as the
references' 512-token sample, which only made the token-space error affordable); candidates are scored on
``--search-tokens`` calibration tokens (whole windows, 0 = all; 4096 = 8 windows of 512 by default) - a speed
knob of ours, the references score on every token; candidates are scored in bfloat16 on the CPU
(``--search-dtype``, see :func:`search_dtype`); the grid is tritonq's one grid (``grid.py``: zero kept in
range, fp16-exact scales), not AWQ's min-max grid without the zero. Under duo scaling ratio 0 is
``s ~ 1 / w``, not RTN (AutoAWQ likewise; the spec's "ratio 0 is RTN" holds for version 2 only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...errors import TritonqError
from ..adapters import ScalePair
from ..grid import GridSpec
from ..hessian import HessianAccumulator
from .awq_clip import CLIP_SKIP, apply_clip, clip_search
from .awq_observe import GramObserver, PairObserver
from .awq_scale import (
    Quantizer,
    ScaleSearchOptions,
    scales_for,
    search_dtype,
    search_linear_scale,
    search_linear_scale_with,
    search_module_scale,
)
from .base import LayerResult, Method
from .gptq import GPTQOptions, solve
from .rtn import round_to_nearest

if TYPE_CHECKING:
    from ..distributed import Collective
    from ..groups import Group


@dataclass(frozen=True)
class AWQOptions(ScaleSearchOptions):
    no_clip: bool = field(default=False, metadata={"help": "skip the clip search (scales only)"})
    clip_sym: bool = field(default=False, metadata={
        "help": "clip symmetrically (AutoAWQ) even on an asymmetric grid; default: clip as the grid"})
    clip_grid: int = field(default=20, metadata={"help": "clip shrink factors 1 - i / clip_grid"})
    max_shrink: float = field(default=0.5, metadata={"help": "largest clip shrink (0.5: factors down to 0.55)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip_grid < 1:
            raise TritonqError(f"--clip-grid must be at least 1, got {self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise TritonqError(f"--max-shrink must be in [0, 1), got {self.max_shrink}")


def parent_of(pair: ScalePair) -> str | None:
    """Module whose output scores a pair's candidates: the common parent of several balance linears
    (self_attn for q/k/v, mlp for gate/up), or None for one linear (scored on its own output)."""
    if len(pair.balance) == 1:
        return None
    parts = [name.split(".")[:-1] for name in pair.balance]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or None


def owned_pairs(group: Group) -> list[ScalePair]:
    """The scale pairs one group searches and folds: its own balance linears (norm -> q/k/v), or a smooth
    linear of its own whose consumer comes later (v -> o, up -> down), while nothing in the pair is quantized."""
    names = set(group.names)
    out = []
    for pair in group.adapter.scale_pairs(group.config):
        if group.is_quantized(pair.smooth) or any(group.is_quantized(b) for b in pair.balance):
            continue
        if set(pair.balance) <= names or pair.smooth in names:
            out.append(pair)
    return out


@dataclass
class AWQState:
    """What ``AWQ.observe`` collects for one group."""

    pairs: list[PairObserver]
    own_input: Any  # what ``observe_input`` returned: the Gram blocks for clipping (AWQ+GPTQ: the Hessian)


class AWQ(Method):
    name = "awq"
    summary = "AWQ: activation-aware scales (grid search, folded) + clip search (Lin et al. 2024)"
    Options = AWQOptions
    data_parallel = "replicated"  # folds scales: every rank searches (losses reduced) and folds the same scale
    moments: tuple[str, ...] = ("abs",)  # input moments the scales need: E|x| (DH-AWQ adds E[x^2] and E[x])

    def observe(self, group: Group) -> AWQState:
        pairs = []
        for pair in owned_pairs(group):
            parent = parent_of(pair)
            if parent is None and len(pair.balance) > 1:
                raise TritonqError(f"AWQ needs a module that holds all of {pair.balance} to score their scales")
            obs = PairObserver(pair, parent, self.options.search_tokens, self.moments, group.collective)
            if parent is not None:
                group.on_call(parent, obs.add_call)
            group.on_input(pair.balance[0], obs.add_stat)
            pairs.append(obs)
        return AWQState(pairs, self.observe_input(group))

    def reduce(self, state: AWQState, collective: Collective) -> AWQState:
        """Every pair's moments and sample (``PairObserver.reduce``) and the group's own input statistics (the
        Gram blocks; AWQ+GPTQ's Hessian; DH-AWQ's mean) over every rank's windows."""
        for obs in state.pairs:
            obs.reduce(collective)
        if state.own_input is not None:
            state.own_input.reduce(collective)
        return state

    def observe_input(self, group: Group) -> Any:
        """What the final step needs of the group's own input: the Gram blocks for clipping (None: no clip)."""
        if self.options.no_clip or all(n.rsplit(".", 1)[-1] in CLIP_SKIP for n in group.names):
            return None
        k = group.linears[0].in_features
        gram = GramObserver(k, group.spec.effective_group(k), group.collective)
        group.on_input(group.names[0], gram.add)
        return gram

    def candidates(self, obs: PairObserver, weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
        """The candidate scales ``[A, K]`` of one pair."""
        return scales_for(obs, weights, spec, self.options)

    def scaled_quantizer(self, obs: PairObserver, spec: GridSpec) -> Quantizer | None:
        """``(W, s) -> Q(W s)/s`` used inside the search; None: rounding on the grid (the kernel's path)."""
        return None

    def fold_pair(self, group: Group, obs: PairObserver, scale: torch.Tensor) -> None:
        """Fold the chosen ``scale`` (as wide as the balance input) of one pair into the block."""
        group.fold(obs.pair, scale)

    def search_and_fold(self, group: Group, state: AWQState) -> torch.Tensor | None:
        """Search and fold every pair the group owns; the scale now on the group's own input (or None)."""
        input_scale = None
        for obs in state.pairs:
            pair = obs.pair
            linears = [group.block.get_submodule(n) for n in pair.balance]
            weights = [lin.weight.data for lin in linears]
            candidates = self.candidates(obs, weights, group.spec)
            quantizer = self.scaled_quantizer(obs, group.spec)
            label = f"{pair.smooth} -> {', '.join(pair.balance)} of block {group.index}"
            if obs.parent is not None:
                module = group.block.get_submodule(obs.parent)
                best, _losses = search_module_scale(module, linears, obs.calls, candidates, group.spec, label,
                                                    search_dtype(self.options.search_dtype, weights[0]), quantizer,
                                                    collective=group.collective)
            elif quantizer is None:
                best, _losses = search_linear_scale(weights[0], obs.sample_inputs(), candidates, group.spec, label,
                                                    collective=group.collective)
            else:
                best, _losses = search_linear_scale_with(weights[0], obs.sample_inputs(), candidates, quantizer, label,
                                                         collective=group.collective)
            s = candidates[best].to(weights[0].device)
            self.fold_pair(group, obs, s)
            obs.calls, obs.inputs = [], []
            if set(pair.balance) <= set(group.names):
                input_scale = s
        return input_scale

    def quantize(self, group: Group, state: AWQState) -> list[LayerResult]:
        input_scale = self.search_and_fold(group, state)
        return self.finish(group, state, input_scale)

    def finish(self, group: Group, state: AWQState, input_scale: torch.Tensor | None) -> list[LayerResult]:
        """Clip (unless ``--no-clip`` or a q/k linear) and round every linear of the group."""
        gram = state.own_input.mean(input_scale).to(group.device) if state.own_input is not None else None
        sym_clip = self.options.clip_sym or group.spec.sym
        out = []
        for name, full, lin in zip(group.names, group.full_names, group.linears):
            w = lin.weight.data.float()
            if gram is not None and name.rsplit(".", 1)[-1] not in CLIP_SKIP:
                lo, hi = clip_search(w, gram, group.spec, sym_clip, self.options.clip_grid, self.options.max_shrink)
                w = apply_clip(w, lo, hi)
            out.append(round_to_nearest(w, group.spec, full))
        return out


@dataclass(frozen=True)
class AWQGPTQOptions(ScaleSearchOptions, GPTQOptions):
    """AWQ's scale search options and GPTQ's (no clip: GPTQ picks its own rounding)."""

    def __post_init__(self) -> None:
        ScaleSearchOptions.__post_init__(self)
        GPTQOptions.__post_init__(self)


class AWQGPTQ(AWQ):
    """AWQ scales (searched with RTN inside the loss, folded, no clip), then GPTQ on the scaled weights, as
    llm-compressor users chain ``AWQModifier`` and ``GPTQModifier`` (awq_family.md §7). The Hessian of a
    group whose input was scaled here is the one observed on ``x``, transformed exactly to that of ``x / s``
    (``H / (s s^T)``); GPTQ itself is :func:`tritonq.engine.methods.gptq.solve`."""

    name = "awq+gptq"
    summary = ("AWQ scales (folded, no clip), then GPTQ on the scaled weights; loses to plain awq on SmolLM2-135M "
               "(3 bits g64: 47.12 vs 41.57, bench/RESULTS.md)")
    Options = AWQGPTQOptions

    def act_order_groups(self) -> str | None:
        return self.options.act_order

    def observe_input(self, group: Group) -> HessianAccumulator:
        acc = HessianAccumulator(group.linears[0].in_features, group.device, group.collective)
        group.on_input(group.names[0], acc.add)
        return acc

    def finish(self, group: Group, state: AWQState, input_scale: torch.Tensor | None) -> list[LayerResult]:
        acc = state.own_input
        if acc.tokens == 0:
            raise TritonqError(f"GPTQ saw no calibration tokens for {group.label}; give calibration data")
        hessian = acc.hessian
        if input_scale is not None:
            inv = 1.0 / input_scale.to(hessian)
            hessian = hessian * inv[:, None] * inv[None, :]
        o = self.options
        gptq = GPTQOptions(act_order=o.act_order, damp=o.damp, block_size=o.block_size)
        return solve([lin.weight.data for lin in group.linears], hessian, group.spec, group.full_names, gptq)
