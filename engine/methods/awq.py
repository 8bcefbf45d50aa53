"""AWQ: activation-aware scales searched on a grid, folded into the producers, then clip search and rounding.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024
(arXiv:2306.00978), as specified in ``../shared/docs/awq_family.md`` §3 (llm-awq / AutoAWQ) with the llmc
variants of §3.3-3.4 (seed 002: asymmetric clipping, scale formula version 2). This file is the one
implementation of the scale search, the clip search and the folding; A-BoA and AWQ+GPTQ reuse its functions.

Function-level API (every step usable alone):

* :class:`PairObserver` - what one scale pair needs from the calibration pass: ``mean |x|`` per input channel
  over all tokens, plus a token sample to score candidates on (the parent module's calls, or the inputs of a
  single balance linear);
* :func:`weight_mean` and :func:`candidate_scales` - the scale formula (version 1: AutoAWQ's "duo" scaling
  ``x^a / w^(1-a)``; version 2: llm-awq/llmc's ``x^a``), normalised to a geometric centre of 1;
* :func:`search_module_scale` (loss on the parent module's output: self_attn for q/k/v, mlp for gate/up) and
  :func:`search_linear_scale` (loss on one linear's output, through the ``awq_scale_loss`` kernel);
* :func:`clip_search` / :func:`apply_clip` - per output row and group, shrink factors 1.0 .. 0.55, error
  ``d^T H_g d`` on the group's diagonal Gram block (the exact Gram form of §3.4);
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

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ... import kernels
from ...errors import TritonqError
from ...kernels.grid_rule import minmax_scale_zero
from ..adapters import ScalePair
from ..grid import GridSpec, fit_groups, group_block_error, keep_better
from ..hessian import HessianAccumulator
from .base import LayerResult, Method
from .gptq import GPTQOptions, solve
from .rtn import round_to_nearest

if TYPE_CHECKING:
    from ..groups import Group

SEARCH_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Linears whose clip is skipped (llm-awq: "q.k product is hard to clip precisely"); exact leaf names
CLIP_SKIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleSearchOptions:
    """Settings of the AWQ scale search (shared by ``awq`` and ``awq+gptq``)."""

    awq_version: int = field(default=1, metadata={
        "help": "scale formula: 1 = mean|x|^a / w^(1-a) (AutoAWQ duo scaling), 2 = mean|x|^a (llm-awq, llmc v2)",
        "choices": ("1", "2"), "const": "2"})
    n_grid: int = field(default=20, metadata={"help": "ratios a = i / n_grid, i = 0 .. n_grid-1"})
    search_tokens: int = field(default=4096, metadata={
        "help": "calibration tokens (whole windows) the scale candidates are scored on; 0 = all"})
    search_dtype: str = field(default="auto", metadata={
        "help": "dtype of the module forwards that score candidates: auto (the model's; bfloat16 for a float32 "
                "model on the CPU), float32, bfloat16, float16", "choices": tuple(SEARCH_DTYPES), "const": "bfloat16"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "awq_version", int(self.awq_version))
        if self.awq_version not in (1, 2):
            raise TritonqError(f"--awq-version must be 1 or 2, got {self.awq_version}")
        if self.n_grid < 1:
            raise TritonqError(f"--n-grid must be at least 1, got {self.n_grid}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise TritonqError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}, got {self.search_dtype!r}")
        if self.search_tokens < 0:
            raise TritonqError(f"--search-tokens must be 0 (all) or positive, got {self.search_tokens}")


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


# ----------------------------------------------------------------------------------------------------------
# statistics


class PairObserver:
    """Calibration statistics of one scale pair, fed by the pipeline's hooks.

    ``mean |x|`` of the balance input over every token; a sample of ``sample_tokens`` tokens (0 = all) to
    score candidates on: the parent module's calls (``add_call``) or the balance linear's inputs (``add_stat``).
    """

    def __init__(self, pair: ScalePair, parent: str | None, sample_tokens: int,
                 moments: tuple[str, ...] = ("abs", "sq", "sum")) -> None:
        self.pair = pair
        self.moments = moments  # which of |x|, x^2, x to sum (each is a pass over every token in fp64)
        self.parent = parent  # module whose output scores candidates; None: the single balance linear
        self.sample_tokens = sample_tokens
        self.abs_sum: torch.Tensor | None = None  # fp64 sums per channel of |x|, x^2 and x
        self.sq_sum: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.tokens = 0
        self.calls: list[tuple[tuple, dict]] = []
        self.inputs: list[torch.Tensor] = []
        self.sampled = 0

    def _sample_full(self) -> bool:
        return 0 < self.sample_tokens <= self.sampled

    def add_stat(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()

        def add(total: torch.Tensor | None, moment: str, values: Callable[[], torch.Tensor]) -> torch.Tensor | None:
            if moment not in self.moments:
                return None
            part = values().sum(dim=0, dtype=torch.float64)
            return part if total is None else total + part

        self.abs_sum = add(self.abs_sum, "abs", flat.abs)
        self.sq_sum = add(self.sq_sum, "sq", flat.square)
        self.sum = add(self.sum, "sum", lambda: flat)
        self.tokens += flat.shape[0]
        if self.parent is None and not self._sample_full():
            self.inputs.append(x.reshape(-1, x.shape[-1]))
            self.sampled += flat.shape[0]

    def add_call(self, args: tuple, kwargs: dict) -> None:
        if self._sample_full():
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        windows, per_window = hidden.shape[0], hidden.shape[1:-1].numel()
        if self.sample_tokens and hidden.dim() > 2:  # whole windows: attention needs its full sequence
            need = -(-(self.sample_tokens - self.sampled) // per_window)
            if need < windows:
                args, kwargs = _take_windows(args, windows, need), _take_windows(kwargs, windows, need)
                windows = need
        self.calls.append((args, dict(kwargs)))
        self.sampled += windows * per_window

    def _mean(self, total: torch.Tensor | None, moment: str) -> torch.Tensor:
        if not self.tokens:
            raise TritonqError(f"AWQ saw no calibration tokens for the inputs of {self.pair.balance[0]}; "
                               "give calibration data")
        if moment not in self.moments:
            raise TritonqError(f"the observer of {self.pair.balance[0]} did not collect the {moment!r} moment; "
                               f"pass moments including it (it has {self.moments})")
        return (total / self.tokens).float()

    def mean_abs(self) -> torch.Tensor:
        """``E|x_j|`` (AWQ's activation statistic)."""
        return self._mean(self.abs_sum, "abs")

    def mean_sq(self) -> torch.Tensor:
        """``E[x_j^2]`` (DH-AWQ's "L2 salience")."""
        return self._mean(self.sq_sum, "sq")

    def mean(self) -> torch.Tensor:
        """``E[x_j]`` (DH-AWQ's mean input)."""
        return self._mean(self.sum, "sum")

    def sample_inputs(self) -> torch.Tensor:
        x = torch.cat(self.inputs)
        return x[: self.sample_tokens] if self.sample_tokens else x


def _take_windows(value: Any, windows: int, keep: int) -> Any:
    """The first ``keep`` windows of a module call's arguments: tensors whose leading dimension is the batch
    are sliced, broadcast ones (position embeddings of shape [1, T, D], masks [1, 1, T, T]) kept."""
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() and value.shape[0] == windows else value
    if isinstance(value, tuple):
        return tuple(_take_windows(v, windows, keep) for v in value)
    if isinstance(value, list):
        return [_take_windows(v, windows, keep) for v in value]
    if isinstance(value, dict):
        return {k: _take_windows(v, windows, keep) for k, v in value.items()}
    return value


class GramObserver:
    """Diagonal ``g x g`` blocks of ``sum_t x_t x_t^T`` of one input (fp64 sums; the clip error's Gram form)."""

    def __init__(self, in_features: int, group: int) -> None:
        self.group = group
        self.blocks: torch.Tensor | None = None
        self.tokens = 0
        self.in_features = in_features

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, self.in_features).float()
        grouped = flat.reshape(flat.shape[0], -1, self.group).transpose(0, 1)  # [G, T, g]
        part = (grouped.transpose(1, 2) @ grouped).double()
        self.blocks = part if self.blocks is None else self.blocks + part
        self.tokens += flat.shape[0]

    def mean(self, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``[G, g, g]`` fp32 mean over tokens; of ``x / input_scale`` when given (exact rescaling)."""
        h = self.blocks / max(self.tokens, 1)
        if input_scale is not None:
            inv = (1.0 / input_scale.double()).reshape(-1, self.group)
            h = h * inv[:, :, None] * inv[:, None, :]
        return h.float()


# ----------------------------------------------------------------------------------------------------------
# the scale formula and the search


def weight_mean(weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
    """``w_j``: mean over the rows of every linear of ``|W_ij| / max|W|`` of the element's quantization group
    (AutoAWQ's ``get_act_scale``-free weight statistic of duo scaling; rows of all linears concatenated)."""
    w = torch.cat([x.float() for x in weights], dim=0)
    n, k = w.shape
    g = spec.effective_group(k)
    grouped = w.abs().reshape(n, k // g, g)
    normed = grouped / (grouped.amax(dim=2, keepdim=True) + 1e-6)
    return normed.reshape(n, k).mean(dim=0)


def grid_ratios(n_grid: int) -> torch.Tensor:
    """The ratios tried: ``i / n_grid`` for ``i = 0 .. n_grid-1`` (ratio 1 not tried, as llm-awq/AutoAWQ)."""
    return torch.arange(n_grid, dtype=torch.float64) / n_grid


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratios: torch.Tensor) -> torch.Tensor:
    """Scales ``[A, K]`` for every ratio: ``max(x^a / (w^(1-a) + 1e-4), 1e-4)`` (duo, ``w_mean`` given) or
    ``max(x^a, 1e-4)``; each divided by ``sqrt(max * min)``; non-finite entries set to 1 (AutoAWQ)."""
    x = x_mean.double()[None]
    a = ratios.double()[:, None]
    if w_mean is None:
        s = x.pow(a)
    else:
        s = x.pow(a) / (w_mean.double()[None].pow(1 - a) + 1e-4)
    s = s.clamp(min=1e-4)
    s = s / torch.sqrt(s.amax(dim=1, keepdim=True) * s.amin(dim=1, keepdim=True))
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return s.float()


def scales_for(observer: PairObserver, weights: list[torch.Tensor], spec: GridSpec,
               options: ScaleSearchOptions) -> torch.Tensor:
    """The candidate scales of one pair under ``options`` (version 1: duo, version 2: activations only)."""
    w_mean = weight_mean(weights, spec) if options.awq_version == 1 else None
    return candidate_scales(observer.mean_abs().to(weights[0].device), w_mean, grid_ratios(options.n_grid))


def pick_best(losses: torch.Tensor, label: str) -> int:
    """Index of the smallest loss, the first one on ties (llm-awq's strict ``<``); all-NaN is an error."""
    finite = torch.isfinite(losses)
    if not finite.any():
        raise TritonqError(f"every AWQ scale candidate of {label} gave a non-finite loss; check the model's float "
                           "outputs (or run with --dtype float32)")
    masked = torch.where(finite, losses.double(), torch.full_like(losses.double(), math.inf))
    return int(torch.argmin(masked))


def fake_quantize_grouped(w: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``Q(W)`` on the shared grid, as :func:`round_to_nearest` computes it (bit for bit), on the ``[N, G, g]``
    view with broadcast group parameters instead of gathered ``[N, K]`` ones (3x faster on the CPU)."""
    return _fake_quantize_inplace(w.float().clone(), spec)


def _fake_quantize_inplace(w: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``Q(w)`` written over ``w`` (fp32 ``[N, K]``, owned by the caller): the operations of
    :func:`tritonq.engine.grid.fake_quantize` in the same order, so bit for bit the same values, but one buffer
    instead of six (the search calls this 20 times per scale pair and per clip factor)."""
    n, k = w.shape
    g = spec.effective_group(k)
    grouped = w.view(n, k // g, g)
    if spec.mse:
        scale, zero = fit_groups(w, spec)
    else:  # the min-max fit of fit_rows, its two reductions in one pass
        lo, hi = torch.aminmax(grouped, dim=2)
        scale, zero = minmax_scale_zero(lo, hi, spec.maxq, spec.sym)
    scale, zero = scale[..., None], zero[..., None]
    grouped.div_(scale).round_().add_(zero).clamp_(0, spec.maxq).sub_(zero).mul_(scale)
    return w


def fake_quantize_scaled(w: torch.Tensor, s: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``Q(W * s) / s`` on the shared grid (fp32)."""
    sf = s.float()[None, :]
    return _fake_quantize_inplace(w.float() * sf, spec).div_(sf)


def _call(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def search_dtype(name: str, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype candidates are scored in: ``auto`` is the model's, except bfloat16 for float32 on a CPU with
    native bf16 arithmetic (AVX512-BF16 or AMX: ~3x faster matmuls there; the references score in the model's
    half precision, AutoAWQ loads fp16). CPUs without it emulate bf16, slower than fp32, so they keep fp32."""
    if name == "auto":
        native_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        on_cpu_fp32 = weight.dtype == torch.float32 and weight.device.type == "cpu"
        return torch.bfloat16 if on_cpu_fp32 and native_bf16 else None
    return SEARCH_DTYPES[name]


Quantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (W, s) -> the weight kept, Q(W s) / s


def search_module_scale(module: nn.Module, linears: list[nn.Linear], calls: list[tuple[tuple, dict]],
                        candidates: torch.Tensor, spec: GridSpec, label: str = "module",
                        dtype: torch.dtype | None = None,
                        quantizer: Quantizer | None = None) -> tuple[int, torch.Tensor]:
    """Score every candidate by the mean squared error of ``module``'s output when each of ``linears`` holds
    ``Q(W s)/s``, against its float output on the same ``calls``; restores the weights. (best, losses).

    ``dtype``: run the forwards on a copy of the module in that dtype (the references score in the model's
    half precision; on the CPU bf16 matmuls are ~3x faster than fp32). The candidates' weights are computed
    in fp32 either way and the squared errors summed in fp64. ``quantizer``: ``(W, s) -> Q(W s)/s`` (default:
    rounding on the grid, :func:`fake_quantize_scaled`).
    """
    quantizer = quantizer or (lambda w, s: fake_quantize_scaled(w, s, spec))
    if dtype is not None and dtype != linears[0].weight.dtype:
        import copy

        names = {id(m): n for n, m in module.named_modules()}
        lin_names = [names[id(lin)] for lin in linears]
        module = copy.deepcopy(module).to(dtype)
        linears_work = [module.get_submodule(n) for n in lin_names]
        calls = [(_cast(a, dtype), _cast(k, dtype)) for a, k in calls]
        originals = [lin.weight.data.float() for lin in linears]
        return _score_candidates(module, linears_work, originals, calls, candidates, quantizer, label)
    return _score_candidates(module, linears, [lin.weight.data.clone() for lin in linears], calls, candidates,
                             quantizer, label)


def _score_candidates(module: nn.Module, linears: list[nn.Linear], originals: list[torch.Tensor],
                      calls: list[tuple[tuple, dict]], candidates: torch.Tensor, quantizer: Quantizer,
                      label: str) -> tuple[int, torch.Tensor]:
    with torch.no_grad():
        targets = [_call(module, a, k).float() for a, k in calls]
        losses = torch.empty(candidates.shape[0], dtype=torch.float64)
        try:
            for i, s in enumerate(candidates):
                for lin, w in zip(linears, originals):
                    lin.weight.data.copy_(quantizer(w.float(), s))  # copy_ rounds once to the module's dtype
                total, count = 0.0, 0
                for (a, k), target in zip(calls, targets):
                    diff = _call(module, a, k).float()  # a fresh output: safe to overwrite
                    total += float(diff.sub_(target).square_().sum(dtype=torch.float64))
                    count += target.numel()
                losses[i] = total / max(count, 1)
        finally:
            for lin, w in zip(linears, originals):
                lin.weight.data.copy_(w.to(lin.weight.dtype))
    return pick_best(losses, label), losses


def search_linear_scale(weight: torch.Tensor, inputs: torch.Tensor, candidates: torch.Tensor, spec: GridSpec,
                        label: str = "linear", force: str | None = None) -> tuple[int, torch.Tensor]:
    """Score every candidate by the output error of one linear on ``inputs`` (the ``awq_scale_loss`` kernel:
    no candidate weight is stored); (best, losses)."""
    g = -1 if spec.group_size == -1 else spec.group_size
    losses = kernels.awq_scale_loss(weight.float(), inputs, candidates.to(weight.device), g, spec.maxq, spec.sym,
                                    force=force)
    return pick_best(losses.cpu(), label), losses.cpu()


def search_linear_scale_with(weight: torch.Tensor, inputs: torch.Tensor, candidates: torch.Tensor,
                             quantizer: Quantizer, label: str = "linear") -> tuple[int, torch.Tensor]:
    """:func:`search_linear_scale` for another quantizer than rounding (torch, Gram form ``tr(E X^T X E^T)``)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    gram = x.t() @ x
    losses = torch.empty(candidates.shape[0], dtype=torch.float64)
    for i, s in enumerate(candidates):
        err = quantizer(weight.float(), s.to(weight.device)) - weight.float()
        losses[i] = float(((err @ gram) * err).sum(dtype=torch.float64)) / (x.shape[0] * weight.shape[0])
    return pick_best(losses, label), losses


# ----------------------------------------------------------------------------------------------------------
# clipping


def clip_search(weight: torch.Tensor, gram: torch.Tensor, spec: GridSpec, sym_clip: bool, n_grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clip range ``(lo, hi)`` per row and group, both ``[N, G]`` (§3.4).

    Candidates ``f = 1 - i / n_grid`` for ``i < max_shrink * n_grid``: symmetric ``[-f absmax, f absmax]`` or
    asymmetric ``[f min, f max]`` (llmc); the clamped group is re-fitted and rounded on the grid, and its error
    is ``d^T H_g d`` with ``d = Q(clamp(w)) - w`` and ``H_g`` = ``gram[group]`` (mean of ``x x^T`` over tokens).
    ``f = 1`` comes first and only a strictly smaller error replaces it, so the error never grows.
    """
    n, k = weight.shape
    g = spec.effective_group(k)
    w = weight.float().reshape(n, k // g, g)
    if sym_clip:
        hi0 = w.abs().amax(dim=2)
        lo0 = -hi0
    else:
        lo0, hi0 = w.amin(dim=2), w.amax(dim=2)
    best_err = torch.full(lo0.shape, math.inf, device=w.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        f = 1.0 - i / n_grid
        lo, hi = f * lo0, f * hi0
        clamped = torch.minimum(w, hi[..., None])
        torch.maximum(clamped, lo[..., None], out=clamped)
        d = _fake_quantize_inplace(clamped.view(n, k), spec).view(n, k // g, g).sub_(w)
        best_err, (best_lo, best_hi) = keep_better(best_err, group_block_error(d, gram), (best_lo, best_hi), (lo, hi))
    return best_lo, best_hi


def apply_clip(weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp(W, lo, hi)`` per row and group (``lo``/``hi`` ``[N, G]``)."""
    n, k = weight.shape
    g = k // lo.shape[1]
    w = weight.float().reshape(n, -1, g)
    return torch.maximum(torch.minimum(w, hi[..., None]), lo[..., None]).reshape(n, k)


# ----------------------------------------------------------------------------------------------------------
# the method


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
    moments: tuple[str, ...] = ("abs",)  # input moments the scales need: E|x| (DH-AWQ adds E[x^2] and E[x])

    def observe(self, group: Group) -> AWQState:
        pairs = []
        for pair in owned_pairs(group):
            parent = parent_of(pair)
            if parent is None and len(pair.balance) > 1:
                raise TritonqError(f"AWQ needs a module that holds all of {pair.balance} to score their scales")
            obs = PairObserver(pair, parent, self.options.search_tokens, self.moments)
            if parent is not None:
                group.on_call(parent, obs.add_call)
            group.on_input(pair.balance[0], obs.add_stat)
            pairs.append(obs)
        return AWQState(pairs, self.observe_input(group))

    def observe_input(self, group: Group) -> Any:
        """What the final step needs of the group's own input: the Gram blocks for clipping (None: no clip)."""
        if self.options.no_clip or all(n.rsplit(".", 1)[-1] in CLIP_SKIP for n in group.names):
            return None
        k = group.linears[0].in_features
        gram = GramObserver(k, group.spec.effective_group(k))
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
                                                    search_dtype(self.options.search_dtype, weights[0]), quantizer)
            elif quantizer is None:
                best, _losses = search_linear_scale(weights[0], obs.sample_inputs(), candidates, group.spec, label)
            else:
                best, _losses = search_linear_scale_with(weights[0], obs.sample_inputs(), candidates, quantizer, label)
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
    summary = "AWQ scales (folded, no clip), then GPTQ on the scaled weights"
    Options = AWQGPTQOptions

    def act_order_groups(self) -> str | None:
        return self.options.act_order

    def observe_input(self, group: Group) -> HessianAccumulator:
        acc = HessianAccumulator(group.linears[0].in_features, group.device)
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
