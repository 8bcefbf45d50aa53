"""Dynamic-heuristic AWQ (``--method dh-awq``): AWQ scales with an L2 salience, and a rounding that flips a
few weights to the other neighbouring grid point so that each row's error on the mean input cancels.

Source: anhnda/FPRAG ``awq_dh_xl.py`` and its README ("Dynamic Heuristic AWQ"; a research repository, no
paper), as specified in ``../shared/docs/awq_family.md`` §8, in tritonq's packable adaptation (§8 "tritonq
spec", ours):

* scales as AWQ (:mod:`.awq`, :mod:`.awq_scale`: same groups, search and folding), salience ``E[x^2]``
  (clamped at 1e-5),
  ``s = E[x^2]^a`` for ``a`` in ``{0, 0.05, .., 1}`` (21 points), normalised; the quantizer inside the search
  and the final one is :func:`heuristic_quantize` on ``W s`` with the mean input ``m' = E[x] / s``;
* :func:`heuristic_quantize`: round on the shared grid, row error ``e_i = sum_j (W - Wq)_ij m'_j``; every
  weight may move to its other neighbouring code (direction of its unrounded code), which lowers ``e_i`` by
  ``m'_j * dir * scale``; candidates with the sign of ``e_i``, inside the code range and off the Kneedle
  outlier channels of ``|m'|`` are taken in order of closeness to the rounding midpoint; the number taken
  minimises ``|e_i - sum of impacts|`` over at most ``--max-flip-percent`` of the row (our default; the
  reference's argmin-over-all-then-truncate is ``--dh-reference-cap``). Either way ``|e_i|`` never grows.

Differences from the reference (deliberate): the scales are folded into the producers (the reference keeps
``W_q / s`` in float, not packable); the grid is tritonq's (zero in range, the model's group size instead of
the reference's fixed 128); lm_head stays in float (AWQ convention; the reference quantizes it); the search
loss is AWQ's module/linear output loss (the reference scores each linear alone on 2048 random tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...errors import TritonqError
from ..distributed import SINGLE, Collective, OrderedSum
from ..grid import GridSpec, default_g_idx, dequantize_codes, fit_groups, quantize_codes
from .awq import AWQ, AWQState
from .awq_observe import PairObserver
from .awq_scale import SEARCH_DTYPES, Quantizer, candidate_scales
from .base import LayerResult

if TYPE_CHECKING:
    from ..groups import Group


@dataclass(frozen=True)
class DHAWQOptions:
    n_grid: int = field(default=20, metadata={"help": "ratios a = i / n_grid, i = 0 .. n_grid (dh-awq tries 1)"})
    search_tokens: int = field(default=4096, metadata={
        "help": "calibration tokens (whole windows) the scale candidates are scored on; 0 = all"})
    search_dtype: str = field(default="auto", metadata={
        "help": "dtype of the module forwards that score candidates: auto (the model's; bfloat16 for a float32 "
                "model on the CPU), float32, bfloat16, float16", "choices": tuple(SEARCH_DTYPES), "const": "bfloat16"})
    max_flip_percent: float = field(default=0.01, metadata={
        "help": "most weights per row the heuristic rounding may flip, as a fraction of the row"})
    knee_tolerance: float = field(default=0.0, metadata={
        "help": "Kneedle knee shift, a fraction of the half-length of the sorted |mean input|"})
    dh_reference_cap: bool = field(default=False, metadata={
        "help": "the reference's cap: best number of flips over all, then truncated (default: best under the cap)"})

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise TritonqError(f"--n-grid must be at least 1, got {self.n_grid}")
        if not 0 <= self.max_flip_percent <= 1:
            raise TritonqError(f"--max-flip-percent must be in [0, 1], got {self.max_flip_percent}")
        if self.knee_tolerance < 0:
            raise TritonqError(f"--knee-tolerance must be >= 0, got {self.knee_tolerance}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise TritonqError(f"--search-dtype must be one of {', '.join(SEARCH_DTYPES)}, got {self.search_dtype!r}")
        if self.search_tokens < 0:
            raise TritonqError(f"--search-tokens must be 0 (all) or positive, got {self.search_tokens}")


def kneedle_outliers(values: torch.Tensor, knee_tolerance: float = 0.0) -> torch.Tensor:
    """Boolean mask of outliers of ``values`` (>= 0): above the knee of the descending-sorted first half.

    The half is normalised to [0, 1] against an index axis on [0, 1]; the knee is the point farthest from the
    chord between its ends, shifted by ``knee_tolerance * half`` indices; fewer than 3 points: the top 5%.
    """
    v = values.float()
    ordered = torch.sort(v, descending=True).values
    half = ordered[: v.numel() // 2]
    if half.numel() < 3:
        k = max(1, int(0.05 * v.numel()))
        threshold = ordered[min(k, v.numel()) - 1]
        return v >= threshold if k < v.numel() else torch.zeros_like(v, dtype=torch.bool)
    span = half[0] - half[-1]
    if span <= 0:
        return torch.zeros_like(v, dtype=torch.bool)
    y = (half - half[-1]) / span
    x = torch.linspace(0, 1, half.numel(), device=v.device)
    chord = y[0] + (y[-1] - y[0]) * x
    knee = int(torch.argmax((y - chord).abs()))
    knee = min(half.numel() - 1, knee + int(knee_tolerance * half.numel()))
    return v > half[knee]


@dataclass
class HeuristicResult:
    result: LayerResult
    flips: torch.Tensor  # int [N]: flips per row
    error_before: torch.Tensor  # [N]: e_i after plain rounding
    error_after: torch.Tensor  # [N]


def heuristic_quantize(weight: torch.Tensor, mean_input: torch.Tensor, spec: GridSpec, max_flip_percent: float,
                       knee_tolerance: float = 0.0, reference_cap: bool = False) -> HeuristicResult:
    """Round ``weight`` [N, K] on the shared grid, then flip codes to cancel each row's mean-input error."""
    w = weight.float()
    n, k = w.shape
    m = mean_input.float().to(w.device)
    scale, zero = fit_groups(w, spec)
    g_idx = default_g_idx(k, spec).to(w.device)
    sc, zc = scale[:, g_idx.long()], zero[:, g_idx.long()]
    codes = quantize_codes(w, sc, zc, spec.maxq)
    frac = w / sc - (codes - zc)  # unrounded code minus the code
    deq = dequantize_codes(codes, sc, zc)
    err = ((w - deq) * m[None]).sum(dim=1)
    direction = torch.where(frac < 0, -1.0, 1.0)
    impact = m[None] * direction * sc
    outlier = kneedle_outliers(m.abs(), knee_tolerance)
    moved = codes + direction
    valid = ((torch.sign(impact) == torch.sign(err)[:, None]) & (impact != 0) & (moved >= 0) & (moved <= spec.maxq)
             & ~outlier[None])
    cap = int(max_flip_percent * k)
    flips = torch.zeros(n, dtype=torch.long, device=w.device)
    if cap > 0 and bool(valid.any()):
        key = torch.where(valid, frac.abs(), torch.full_like(frac, -1.0))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        taken_impact = torch.gather(torch.where(valid, impact, torch.zeros_like(impact)), 1, order)
        residual = (err[:, None] - torch.cumsum(taken_impact, dim=1)).abs()
        residual = torch.cat([err.abs()[:, None], residual], dim=1)  # k = 0 flips first
        n_valid = valid.sum(dim=1)
        ks = torch.arange(k + 1, device=w.device)[None]
        residual = torch.where(ks <= n_valid[:, None], residual, torch.full_like(residual, float("inf")))
        if reference_cap:
            flips = torch.clamp(torch.argmin(residual, dim=1), max=cap)
        else:
            flips = torch.argmin(residual[:, : cap + 1], dim=1)
        chosen_sorted = ks[:, 1:] <= flips[:, None]
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, order, chosen_sorted)
        codes = codes + torch.where(chosen, direction, torch.zeros_like(direction))
    q = dequantize_codes(codes, sc, zc)
    after = ((w - q) * m[None]).sum(dim=1)
    return HeuristicResult(LayerResult(q, scale, zero, g_idx, {"flips": int(flips.sum())}), flips, err, after)


class _MeanObserver:
    """``E[x]`` per channel of one input."""

    def __init__(self, collective: Collective = SINGLE) -> None:
        self._total = OrderedSum(collective)  # fp64, in chunk order (several ranks: finished in that order)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float()
        self._total.add(flat.sum(dim=0, dtype=torch.float64))
        self.tokens += flat.shape[0]

    def reduce(self, collective: Collective) -> None:
        """The sum and token count of every rank, the sum finished in one process's chunk order."""
        if collective.world == 1:
            return
        self._total.reduce(collective)
        self.tokens = collective.sum_count(self.tokens)

    def mean(self) -> torch.Tensor:
        if not self.tokens:
            raise TritonqError("DH-AWQ saw no calibration tokens; give calibration data")
        return (self._total.total / self.tokens).float()


class DHAWQ(AWQ):
    name = "dh-awq"
    summary = ("dynamic-heuristic AWQ: L2-salience scales (folded) + mean-error-cancelling code flips (FPRAG); "
               "loses to plain awq on SmolLM2-135M (3 bits g64: 44.41 vs 41.57, bench/RESULTS.md)")
    Options = DHAWQOptions
    moments = ("sq", "sum")  # E[x^2] salience and the mean input E[x]

    def candidates(self, obs: PairObserver, weights: list[torch.Tensor], spec: GridSpec) -> torch.Tensor:
        ratios = torch.arange(self.options.n_grid + 1, dtype=torch.float64) / self.options.n_grid
        return candidate_scales(obs.mean_sq().clamp(min=1e-5).to(weights[0].device), None, ratios)

    def scaled_quantizer(self, obs: PairObserver, spec: GridSpec) -> Quantizer:
        mean = obs.mean()

        def quantize(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            sf = s.float().to(w.device)
            return self._round(w * sf[None], mean.to(w.device) / sf, spec).result.weight / sf[None]

        return quantize

    def _round(self, w: torch.Tensor, mean: torch.Tensor, spec: GridSpec) -> HeuristicResult:
        o = self.options
        return heuristic_quantize(w, mean, spec, o.max_flip_percent, o.knee_tolerance, o.dh_reference_cap)

    def observe_input(self, group: Group) -> _MeanObserver:
        obs = _MeanObserver(group.collective)
        group.on_input(group.names[0], obs.add)
        return obs

    def finish(self, group: Group, state: AWQState, input_scale: torch.Tensor | None) -> list[LayerResult]:
        mean = state.own_input.mean().to(group.device)
        if input_scale is not None:
            mean = mean / input_scale.float()
        return [self._round(lin.weight.data, mean, group.spec).result for lin in group.linears]
