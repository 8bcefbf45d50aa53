"""The min-max grid rule and quantize -> dequantize, written once: the host fit and rounding (``engine/grid.py``
and the methods), the kernels' PyTorch references and, by transcription, the in-kernel fit and rounding of
:mod:`.grid_fit` that every kernel calls (tested bit-exact against these functions).

It depends on torch only, so that both ``kernels/`` and ``engine/`` can import it (dependencies point down,
``../shared/docs/style.md`` §5).

Rule (GPTQ's ``Quantizer.find_params`` in ``quant.py`` of IST-DASLab/gptq, Frantar et al., arXiv:2210.17323;
conventions in ``engine/grid.py``): the range is widened to contain zero, ``[min(lo, 0), max(hi, 0)]``;
asymmetric ``scale = (hi - lo) / maxq`` and ``zero = clamp(round(-lo / scale), 0, maxq)``; symmetric
``scale = 2 * max(-lo, hi) / maxq`` and ``zero = (maxq + 1) / 2``. The scale is clamped to
:data:`MIN_SCALE` and rounded to the nearest fp16 value before the zero is computed from it, so that the
fp16 scales of the packed formats reproduce the fake-quantized weights exactly.
"""

from __future__ import annotations

import torch

# Smallest scale allowed: the smallest normal fp16 number (2^-14 = 6.1e-5). A smaller scale would be a
# subnormal or flush to zero in the fp16 scales of the checkpoint formats.
MIN_SCALE = 2.0**-14
# Smallest dynamic activation scale (SmoothQuant's clamp): an all-zero token keeps a finite scale. Shared by
# the engine's activation quantizer and the int8 kernels' per-token quantization.
MIN_ACT_SCALE = 1e-5


def minmax_scale_zero(lo: torch.Tensor, hi: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (fp32, the shape of ``lo``) of the grid for the range ``[lo, hi]`` per element.

    ``maxq = 2^bits - 1``. Every operation is one IEEE fp32 operation in a fixed order (no fused
    multiply-add is possible: each result is rounded before the next step), which is what lets the
    Triton kernel reproduce it bit for bit.
    """
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if sym:
        scale = 2.0 * torch.maximum(-lo, hi) / maxq
    else:
        scale = (hi - lo) / maxq
    scale = torch.clamp(scale, min=MIN_SCALE).to(torch.float16).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as float) ``clamp(round(w / scale) + zero, 0, maxq)``; ``scale``/``zero`` (same shape)
    broadcast against ``w``. ``out=w`` writes over ``w`` (one buffer; the same fp32 operations, so the same bits).
    ``round`` is half to even, as the kernels' ``round_half_even``."""
    return torch.div(w, scale, out=out).round_().add_(zero).clamp_(0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     inplace: bool = False) -> torch.Tensor:
    """``scale * (codes - zero)``; ``inplace`` writes over ``codes``."""
    return (codes.sub_(zero) if inplace else codes - zero).mul_(scale)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                  inplace: bool = False) -> torch.Tensor:
    """Quantize then dequantize: the nearest grid point of ``w`` (fp32), ``scale * (codes - zero)``.

    The one host quantize -> dequantize of tritonq (RTN, the searches of AWQ and its variants, the kernels'
    references). ``inplace`` writes over ``w`` (the searches call this for every candidate, one buffer instead
    of three); the operations and their order are the same either way, so the bits are too.
    """
    codes = quantize_codes(w, scale, zero, maxq, out=w if inplace else None)
    return dequantize_codes(codes, scale, zero, inplace=True)
