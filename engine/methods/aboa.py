"""A-BoA: AWQ-style per-input-channel scales, folded exactly into the producers, then BoA on the scaled block.

Specified in ``../shared/docs/boa.md`` §7 and ``../shared/docs/awq_family.md`` §7; neither a paper nor upstream
BoA has it. The only public code (the yifaaan/BOA fork) changes the float model (it quantizes ``W s`` and
never folds ``1 / s`` anywhere), so it is not a reference; the construction here follows §7's corrected one:

1. one scale per input channel, shared by the linears that read the same tensor: q/k/v, gate/up, down, and
   o_proj, whose scale is tied across the query heads of each KV group under grouped-query attention (one
   value channel feeds ``heads / kv_heads`` o_proj columns; unlike AWQ, which skips v -> o under GQA);
2. searched as AWQ does (:mod:`.awq`, :mod:`.awq_scale`: the one implementation of the candidates, the search
   and the folding):
   candidates scored by the error of the module output under round-to-nearest inside the loss, self_attn for
   q/k/v, the MLP for gate/up, the linear's own output for o and down; no clip search (BoA picks its grids);
3. folded into the producers (input_layernorm, post_attention_layernorm, v_proj rows, up_proj rows; OPT's
   LayerNorms and v_proj), so the float block computes the same function;
4. BoA (:mod:`.boa`) on the scaled block. BoA's statistics of q/k/v and gate/up are observed in the stage
   that searches the scale, i.e. on the unscaled input ``x``, and transformed exactly to those of ``x / s``
   (``H / (s s^T)``, the block_v factors likewise; the q/k row factors are unchanged because the queries and
   keys are); o_proj and down_proj are observed after the fold, on the scaled block itself.

The fork's rule is the variant ``--awq-salient-ratio r``: only the ``r`` fraction of input channels with the
largest ``max |x_j|`` is scaled, ``s_j = max|x_j|^a / max_i|W_ij|^(1-a)`` clamped to ``[0.1, 10]``, the others
keep 1 (SmoothQuant's migration formula restricted to salient channels). The fork fixes ``a = 0.5``; here the
ratio is searched like AWQ's unless ``--awq-alpha`` fixes it (which also fixes AWQ's own ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from ...errors import TritonqError
from ..adapters import ScalePair
from ..distributed import SINGLE, Collective
from ..grid import GridSpec
from ..hessian import HessianAccumulator
from .awq import AWQ, AWQState, parent_of
from .awq_observe import PairObserver
from .awq_scale import ScaleSearchOptions, candidate_scales, grid_ratios, weight_mean
from .base import LayerResult
from .boa import AttentionStats, BoA, BoAOptions
from .smoothquant import MIN_WEIGHT_MAX, fold_gqa_value, smoothing_pairs

if TYPE_CHECKING:
    from ..groups import Group

SALIENT_CLAMP = (0.1, 10.0)  # the fork's bounds on a salient channel's scale


@dataclass(frozen=True)
class ABoAOptions(ScaleSearchOptions, BoAOptions):
    """AWQ's scale search options, BoA's options, and the fork's salient-channel rule."""

    awq_salient_ratio: float = field(default=0.0, metadata={
        "help": "scale only this fraction of input channels (largest max|x|) by max|x|^a / max|W|^(1-a) "
                "clamped to [0.1, 10], the rest keep 1 (the A-BoA fork's rule, 0.01 there); 0 = AWQ's scales"})
    awq_alpha: float = field(default=-1.0, metadata={
        "help": "fixed ratio a of the scale formula (the fork: 0.5); negative = search the --n-grid ratios"})

    def __post_init__(self) -> None:
        ScaleSearchOptions.__post_init__(self)
        BoAOptions.__post_init__(self)
        if not 0 <= self.awq_salient_ratio <= 1:
            raise TritonqError(f"--awq-salient-ratio must be in [0, 1], got {self.awq_salient_ratio}")
        if self.awq_alpha > 1:
            raise TritonqError(f"--awq-alpha must be in [0, 1] (or negative to search), got {self.awq_alpha}")

    def ratios(self) -> torch.Tensor:
        """The ratios ``a`` tried: the fixed one, or AWQ's grid."""
        if self.awq_alpha >= 0:
            return torch.tensor([self.awq_alpha], dtype=torch.float64)
        return grid_ratios(self.n_grid)


class TiedPairObserver(PairObserver):
    """:class:`.awq_observe.PairObserver` that also keeps ``max |x_j|`` (the salient rule's statistic) and knows how
    its balance input is tied: ``repeat`` query heads of ``head_dim`` channels share one scale (GQA v -> o)."""

    def __init__(self, pair: ScalePair, parent: str | None, sample_tokens: int, repeat: int = 1,
                 head_dim: int = 0, collective: Collective = SINGLE) -> None:
        super().__init__(pair, parent, sample_tokens, collective=collective)
        self.repeat = repeat
        self.head_dim = head_dim
        self.abs_max: torch.Tensor | None = None

    def add_stat(self, x: torch.Tensor) -> None:
        super().add_stat(x)
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)

    def reduce(self, collective: Collective) -> None:
        """:meth:`PairObserver.reduce`, and ``max |x_j|`` over every rank (exact in any order)."""
        super().reduce(collective)
        if self.abs_max is not None:
            self.abs_max = collective.max(self.abs_max)

    def tie(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """[heads * D] -> [kv_heads * D], the ``mean`` or ``amax`` over the heads sharing a channel."""
        if self.repeat == 1:
            return values
        grouped = values.reshape(-1, self.repeat, self.head_dim)
        return (grouped.mean(dim=1) if reduce == "mean" else grouped.amax(dim=1)).reshape(-1)

    def untie(self, scales: torch.Tensor) -> torch.Tensor:
        """[..., kv_heads * D] -> [..., heads * D]: each channel's scale on every head of its group."""
        if self.repeat == 1:
            return scales
        lead = scales.shape[:-1]
        grouped = scales.reshape(*lead, -1, 1, self.head_dim).expand(*lead, -1, self.repeat, self.head_dim)
        return grouped.reshape(*lead, -1)


def salient_scales(act_max: torch.Tensor, weight_max: torch.Tensor, ratio: float,
                   ratios: torch.Tensor) -> torch.Tensor:
    """Candidates ``[A, K]`` of the fork's rule: the ``ceil(ratio * K)`` channels of largest ``act_max`` get
    ``clamp(act_max^a / weight_max^(1-a), 0.1, 10)`` for each ``a`` of ``ratios``; every other channel 1."""
    k = act_max.numel()
    top = torch.topk(act_max.double(), max(1, math.ceil(ratio * k))).indices
    a = act_max.double()[top][None]
    m = weight_max.double()[top].clamp(min=MIN_WEIGHT_MAX)[None]
    r = ratios.double()[:, None]
    out = torch.ones(ratios.shape[0], k, dtype=torch.float64, device=act_max.device)
    out[:, top] = (a.pow(r) / m.pow(1 - r)).clamp(*SALIENT_CLAMP)
    return out.float()


def rescale_statistics(stats: AttentionStats | HessianAccumulator, scale: torch.Tensor) -> None:
    """Turn BoA's statistics of an input ``x`` into those of ``x / scale``, in place: the input Hessian and the
    block_v factors become ``H / (s s^T)``; the query/key moments do not depend on the scale."""
    inv = 1.0 / scale.double()
    outer = inv[:, None] * inv[None, :]
    acc = stats.inputs if isinstance(stats, AttentionStats) else stats
    acc.hessian.copy_(acc.hessian.double() * outer.to(acc.hessian.device))
    if isinstance(stats, AttentionStats) and stats.value is not None:
        stats.value.copy_(stats.value.double() * outer.to(stats.value.device))


class ABoA(AWQ):
    name = "aboa"
    summary = ("A-BoA: AWQ-style scales (searched, folded exactly, GQA-tied v -> o), then BoA on the scaled block; "
               "not better than plain awq at 3 bits on SmolLM2-135M (bench/RESULTS.md)")
    Options = ABoAOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.boa = BoA(BoAOptions(**{f.name: getattr(self.options, f.name) for f in fields(BoAOptions)}))
        self.scales: dict[str, torch.Tensor] = {}  # chosen scale per folded producer, "<block>.<smooth>"

    def act_order_groups(self) -> str | None:
        return self.boa.act_order_groups()

    def observe(self, group: Group) -> AWQState:
        pairs = []
        for pair, repeat, head_dim in smoothing_pairs(group):  # AWQ's pairs, plus v -> o under GQA
            parent = parent_of(pair)
            if parent is None and len(pair.balance) > 1:
                raise TritonqError(f"A-BoA needs a module that holds all of {pair.balance} to score their scales")
            obs = TiedPairObserver(pair, parent, self.options.search_tokens, repeat, head_dim, group.collective)
            if parent is not None:
                group.on_call(parent, obs.add_call)
            group.on_input(pair.balance[0], obs.add_stat)
            pairs.append(obs)
        return AWQState(pairs, self.observe_input(group))

    def observe_input(self, group: Group) -> AttentionStats | HessianAccumulator:
        return self.boa.observe(group)

    def candidates(self, obs: TiedPairObserver, weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
        o = self.options
        device = weights[0].device
        if o.awq_salient_ratio > 0:
            if obs.abs_max is None:
                obs.mean_abs()  # the error that names the pair
            w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0)
            tied = salient_scales(obs.tie(obs.abs_max.to(device), "amax"), obs.tie(w_max, "amax"),
                                  o.awq_salient_ratio, o.ratios())
        else:
            w_mean = obs.tie(weight_mean(weights, spec), "mean") if o.awq_version == 1 else None
            tied = candidate_scales(obs.tie(obs.mean_abs().to(device), "mean"), w_mean, o.ratios())
        return obs.untie(tied)

    def fold_pair(self, group: Group, obs: TiedPairObserver, scale: torch.Tensor) -> None:
        if obs.repeat > 1:  # every head of a KV group carries the same scale: fold one per value channel
            kv = scale.reshape(-1, obs.repeat, obs.head_dim)[:, 0].reshape(-1)
            fold_gqa_value(group, obs.pair, kv, obs.repeat, obs.head_dim)
        else:
            group.fold(obs.pair, scale)
        self.scales[f"{group.index}.{obs.pair.smooth}"] = scale.detach().cpu()

    def finish(self, group: Group, state: AWQState, input_scale: torch.Tensor | None) -> list[LayerResult]:
        """BoA on the scaled weights, with the statistics of the scaled input."""
        if input_scale is not None:
            rescale_statistics(state.own_input, input_scale)
        return self.boa.quantize(group, state.own_input)
