"""SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, arXiv:2211.10438), following ``../shared/docs/awq_family.md`` §5: W8A8 with the
activation outliers migrated into the weights by per-channel scales folded into the producers.

1. ``a_j = max_t |x_j|`` of every smoothed linear input over the calibration tokens;
2. ``w_j = max`` over the linears sharing the input and over their rows of ``|W_ij|`` (clamped at 1e-5);
   ``s_j = max(a_j^alpha / w_j^(1 - alpha), min_scale)``;
3. fold ``1/s`` into the producer (norm weight, or a linear's rows) and ``s`` into the consumers' columns:
   input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, and beyond the reference (which leaves them
   unsmoothed) v_proj rows -> o_proj and up_proj rows -> down_proj. Under grouped-query attention one value
   channel feeds ``heads / kv_heads`` o_proj columns, so those columns share one scale (the max of their
   statistics), repeated over the query heads of the group (llmc's ``repeat_gqa_scales``);
4. weights round to nearest on the run's grid (SmoothQuant's is per-channel symmetric 8-bit:
   ``--bits 8 --group-size -1 --sym``), activations per-token dynamic symmetric 8-bit (the default
   activation setting of this method; ``--act-*`` flags change it).

Where we differ from the reference: the statistics come from the pipeline's propagation (the earlier blocks
already quantized, W8A8), not from one pass over the float model; with W8A8 these inputs are within
quantization noise of the float ones, and this keeps one forward per block. ``quantize_bmm_input`` (fake
quantization of q/k/v outputs before the attention products) is not applied. tritonq's symmetric weight
grid is GPTQ's (``2 absmax / 255`` at 8 bits, 256 codes), not ``absmax / 127``.

The smoothing helpers (:func:`observe_smoothing`, :func:`fold_smoothing`) are shared with AWRQ's
``--smooth``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...errors import TritonqError
from ..activations import ActSpec
from ..adapters import ScalePair
from .awq import owned_pairs
from .base import LayerResult, Method
from .rtn import round_to_nearest

if TYPE_CHECKING:
    from ..distributed import Collective
    from ..groups import Group

MIN_WEIGHT_MAX = 1e-5


class MaxAbsObserver:
    """``max_t |x_j|`` per input channel over every calibration token (fp32)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.value = m if self.value is None else torch.maximum(self.value, m)

    def reduce(self, collective: Collective) -> None:
        """The max over every rank's tokens (exact in any order)."""
        if self.value is not None:
            self.value = collective.max(self.value)


@dataclass
class SmoothPair:
    """One pair to smooth and its statistic; ``repeat`` > 1 for v -> o under grouped-query attention."""

    pair: ScalePair
    observer: MaxAbsObserver
    repeat: int = 1
    head_dim: int = 0


def smoothing_pairs(group: Group) -> list[tuple[ScalePair, int, int]]:
    """The pairs ``group`` folds (see ``awq.owned_pairs``), plus v -> o under grouped-query attention, which the
    adapter leaves out of ``scale_pairs``; each with its GQA repeat and head dimension."""
    pairs = [(p, 1, 0) for p in owned_pairs(group)]
    geo = group.adapter.geometry(group.config)
    value = group.adapter.value_pair
    if (geo.kv_heads != geo.heads and value.smooth in group.names
            and not any(group.is_quantized(n) for n in (value.smooth, *value.balance))):
        pairs.append((value, geo.heads // geo.kv_heads, geo.head_dim))
    return pairs


def observe_smoothing(group: Group) -> list[SmoothPair]:
    """Register ``max |x|`` on the input of each pair's balance linears (one observer per pair)."""
    out = []
    for pair, repeat, head_dim in smoothing_pairs(group):
        obs = MaxAbsObserver()
        group.on_input(pair.balance[0], obs.add)
        out.append(SmoothPair(pair, obs, repeat, head_dim))
    return out


def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                    min_scale: float) -> torch.Tensor:
    """``s_j = max(a_j^alpha / w_j^(1-alpha), min_scale)`` with ``w_j`` the max |W_ij| over every row of
    every weight (fp32 [K])."""
    w_max = torch.cat([w.float().abs() for w in weights], dim=0).amax(dim=0).clamp(min=MIN_WEIGHT_MAX)
    a = act_max.float().to(w_max.device)
    return (a.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=min_scale)


def _per_kv_channel(values: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """[heads * D] -> [kv_heads * D]: the max over the query heads that share each value channel."""
    return values.view(-1, repeat, head_dim).amax(dim=1).reshape(-1)


def _repeat_heads(values: torch.Tensor, repeat: int, head_dim: int) -> torch.Tensor:
    """[kv_heads * D] -> [heads * D]: each value channel's scale on every query head of its group."""
    return values.view(-1, 1, head_dim).expand(-1, repeat, -1).reshape(-1)


def fold_smoothing(group: Group, pairs: list[SmoothPair], alpha: float, min_scale: float) -> dict[str, torch.Tensor]:
    """Compute and fold each pair's scale; returns the scale per smooth module (for records and tests)."""
    folded = {}
    for sp in pairs:
        if sp.observer.value is None:
            raise TritonqError(f"saw no calibration tokens for the inputs of {sp.pair.balance[0]} in block "
                               f"{group.index}; give calibration data")
        balance = [group.block.get_submodule(n).weight.data for n in sp.pair.balance]
        if sp.repeat == 1:
            s = smoothing_scale(sp.observer.value, balance, alpha, min_scale)
            group.fold(sp.pair, s)
        else:  # one scale per value channel: the statistics of its query heads' columns, reduced
            w_max = torch.cat([w.float().abs() for w in balance]).amax(dim=0).clamp(min=MIN_WEIGHT_MAX)
            a = _per_kv_channel(sp.observer.value.to(w_max.device), sp.repeat, sp.head_dim)
            w_kv = _per_kv_channel(w_max, sp.repeat, sp.head_dim)
            s = (a.pow(alpha) / w_kv.pow(1 - alpha)).clamp(min=min_scale)
            fold_gqa_value(group, sp.pair, s, sp.repeat, sp.head_dim)
        folded[sp.pair.smooth] = s
    return folded


def fold_gqa_value(group: Group, pair: ScalePair, scale_kv: torch.Tensor, repeat: int, head_dim: int) -> None:
    """v_proj rows (and bias) ``/= s``, o_proj columns ``*= s`` repeated over each kv group's query heads:
    exact, since o's input column ``h * D + d`` is value channel ``(h // repeat) * D + d``."""
    late = [n for n in (pair.smooth, *pair.balance) if group.is_quantized(n)]
    if late:
        raise TritonqError(f"cannot fold a scale into {late[0]} of block {group.index}: it is already quantized")
    v = group.block.get_submodule(pair.smooth)
    with torch.no_grad():
        work = torch.promote_types(v.weight.dtype, torch.float32)
        s = scale_kv.to(device=v.weight.device, dtype=work)
        v.weight.copy_((v.weight.to(work) / s[:, None]).to(v.weight.dtype))
        if v.bias is not None:
            v.bias.copy_((v.bias.to(work) / s).to(v.bias.dtype))
        full = _repeat_heads(s, repeat, head_dim)
        for name in pair.balance:
            o = group.block.get_submodule(name)
            o.weight.copy_((o.weight.to(work) * full[None, :]).to(o.weight.dtype))


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float = field(default=0.5, metadata={
        "help": "migration strength: s = max|x|^alpha / max|W|^(1-alpha) (SmoothQuant 0.5; README: 0.8-0.9 Llama)"})

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise TritonqError(f"--alpha must be in [0, 1], got {self.alpha}")


class SmoothQuant(Method):
    name = "smoothquant"
    summary = "SmoothQuant W8A8: max|x| migration scales folded into norms, v and up rows; RTN (Xiao et al. 2023)"
    Options = SmoothQuantOptions
    default_act = ActSpec(bits=8, scheme="per-token", sym=True)
    data_parallel = "replicated"  # folds scales: every rank folds the same max-reduced statistics

    def observe(self, group: Group) -> list[SmoothPair]:
        return observe_smoothing(group)

    def reduce(self, state: list[SmoothPair], collective: Collective) -> list[SmoothPair]:
        for sp in state:
            sp.observer.reduce(collective)
        return state

    def quantize(self, group: Group, state: list[SmoothPair]) -> list[LayerResult]:
        fold_smoothing(group, state, self.options.alpha, MIN_WEIGHT_MAX)
        return [round_to_nearest(lin.weight.data, group.spec, name)
                for lin, name in zip(group.linears, group.full_names)]
