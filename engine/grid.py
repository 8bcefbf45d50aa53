"""The one integer quantization grid shared by every method (RTN, GPTQ, and later AWQ/BoA).

Conventions (``../shared/docs/awq_family.md`` §0.1, GPTQ style; matches the GPTQ, AWQ and
compressed-tensors checkpoint layouts, so packing is exact):

* codes ``q`` are unsigned integers in ``[0, 2^b - 1]`` and ``w = scale * (q - zero)``;
* asymmetric: the range ``[min(w_min, 0), max(w_max, 0)]`` (zero kept in range, so every group,
  including constant ones, is representable), ``scale = (hi - lo) / qmax``, ``zero = round(-lo / scale)``;
* symmetric: ``scale = 2 * absmax / qmax`` and ``zero = 2^(b-1)`` (``absmax / 7.5`` at 4 bits);
* scales are rounded to fp16-representable values so that the fp16 scales of the packed formats
  reproduce the fake-quantized weights bit for bit;
* the min-max rule itself (and ``MIN_SCALE``) is :func:`tritonq.kernels.grid_rule.minmax_scale_zero`, and
  quantize -> dequantize is :func:`tritonq.kernels.grid_rule.fake_quantize` (re-exported here with
  ``quantize_codes``), shared with the kernels' references; the in-kernel copies are tested bit-exact;
* optional shrink (MSE) search over clipped ranges, as GPTQ's ``Quantizer(mse=True)``:
  candidates ``p * [lo, hi]`` for ``p = 1 - i / grid``, error ``sum |Q(w) - w|^norm``.

Reference: Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (arXiv:2210.17323), and its ``quant.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TritonqError
from ..kernels.grid_rule import MIN_SCALE, dequantize_codes, fake_quantize, minmax_scale_zero, quantize_codes

__all__ = ["MIN_SCALE", "GridSpec", "codes_of", "default_g_idx", "dequantize", "dequantize_codes", "fake_quantize",
           "fake_quantize_groups", "fit_groups", "fit_rows", "fit_rows_shrink", "group_block_error", "keep_better",
           "quantize_codes"]


@dataclass(frozen=True)
class GridSpec:
    """How weights are mapped to integers.

    ``group_size=-1`` means one scale per output channel (row); otherwise one per ``group_size``
    consecutive input columns.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    mse: bool = False  # shrink search over clipping ranges
    max_shrink: float = 0.8
    shrink_steps: int = 100
    norm: float = 2.4

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise TritonqError(f"bits must be an integer from 2 to 8, got {self.bits!r}; pass e.g. --bits 4")
        if self.group_size != -1 and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise TritonqError(
                f"group size must be -1 (per channel) or a positive integer, got {self.group_size!r}"
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups_for(self, in_features: int, layer: str = "layer") -> int:
        """Number of groups along the input dimension; a clear error when the size does not divide."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
            hint = f"; group sizes that divide it: {divisors}" if divisors else ""
            raise TritonqError(
                f"group size {self.group_size} does not divide the input width {in_features} of {layer}"
                f"{hint} (or -1 for per-channel)"
            )
        return in_features // self.group_size

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def _params_from_range(lo: torch.Tensor, hi: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from a range per row: the one min-max rule of :mod:`tritonq.kernels.grid_rule`."""
    return minmax_scale_zero(lo, hi, spec.maxq, spec.sym)


def fit_rows(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one (scale, zero) per row of ``w`` [rows, cols]; returns two fp32 tensors of shape [rows]."""
    scale, zero, _ = fit_rows_shrink(w, spec)
    return scale, zero


def fit_rows_shrink(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fit_rows` and the shrink factor ``p`` [rows] it chose: the grid is the min-max one of ``p * [lo, hi]``
    (``p = 1`` without ``spec.mse``), so a method that learns range factors can start from the MSE search's."""
    w = w.float()
    lo = w.amin(dim=1)
    hi = w.amax(dim=1)
    scale, zero = _params_from_range(lo, hi, spec)
    shrink = torch.ones_like(lo)
    if not spec.mse:
        return scale, zero, shrink
    best = torch.full_like(lo, float("inf"))
    for i in range(int(spec.max_shrink * spec.shrink_steps)):
        p = 1.0 - i / spec.shrink_steps
        s1, z1 = _params_from_range(p * lo, p * hi, spec)
        err = (fake_quantize(w, s1[:, None], z1[:, None], spec.maxq) - w).abs_().pow_(spec.norm).sum(dim=1)
        best, (scale, zero, shrink) = keep_better(best, err, (scale, zero, shrink), (s1, z1, torch.full_like(lo, p)))
    return scale, zero, shrink


def keep_better(best: torch.Tensor, score: torch.Tensor, kept: tuple[torch.Tensor, ...],
                candidate: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One step of an elementwise candidate search (grid shrink, AWQ clip, BoA's grids): where ``score < best``
    take ``candidate``'s values. Strictly smaller, so a tie keeps the earlier candidate (the unshrunk range
    comes first in every search). Returns the new best score and the kept values."""
    better = score < best
    return torch.where(better, score, best), tuple(
        torch.where(better, new, old) for old, new in zip(kept, candidate, strict=True))


def group_block_error(err: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``e^T H_g e`` per row and group: ``err`` [N, G, g] against the diagonal Hessian blocks [G, g, g] -> [N, G]."""
    return torch.einsum("ngi,gij,ngj->ng", err, blocks, err)


def fit_groups(weight: torch.Tensor, spec: GridSpec, layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every group of ``weight`` [N, K] at once: scale and zero of shape [N, groups]."""
    n, k = weight.shape
    groups = spec.groups_for(k, layer)
    g = spec.effective_group(k)
    flat = weight.float().reshape(n * groups, g)
    scale, zero = fit_rows(flat, spec)
    return scale.reshape(n, groups), zero.reshape(n, groups)


def fake_quantize_groups(w: torch.Tensor, spec: GridSpec, inplace: bool = False) -> torch.Tensor:
    """``Q(w)`` of ``w`` (fp32 ``[N, K]``) on its own group grids: what :func:`fit_groups` and
    :func:`fake_quantize` give (bit for bit), computed on the ``[N, G, g]`` view with broadcast group parameters
    instead of gathered ``[N, K]`` ones (3x faster on the CPU). ``inplace`` writes over ``w`` (the searches of
    AWQ and its variants call this for every candidate)."""
    w = w if inplace else w.float().clone()
    n, k = w.shape
    g = spec.effective_group(k)
    grouped = w.view(n, k // g, g)
    if spec.mse:
        scale, zero = fit_groups(w, spec)
    else:  # the min-max fit of fit_rows, its two reductions in one pass
        lo, hi = torch.aminmax(grouped, dim=2)
        scale, zero = _params_from_range(lo, hi, spec)
    fake_quantize(grouped, scale[..., None], zero[..., None], spec.maxq, inplace=True)
    return w


def default_g_idx(in_features: int, spec: GridSpec) -> torch.Tensor:
    """Group index of every input column: ``k // g`` (all zeros per channel)."""
    g = spec.effective_group(in_features)
    return torch.arange(in_features, dtype=torch.int32) // g


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Float weights [N, K] from codes [N, K] and per-group scale/zero [N, G] gathered by ``g_idx`` [K]."""
    idx = g_idx.long()
    return dequantize_codes(codes.float(), scale[:, idx], zero[:, idx])


def codes_of(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor, maxq: int
) -> torch.Tensor:
    """Integer codes (uint8) of a weight that lies on the grid given by scale/zero/g_idx."""
    idx = g_idx.long()
    return quantize_codes(weight.float(), scale[:, idx], zero[:, idx], maxq).to(torch.uint8)
