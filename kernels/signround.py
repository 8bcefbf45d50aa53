"""Fake quantization with learned rounding offsets and grid factors (AutoRound's hot path), differentiable.

AutoRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs",
arXiv:2309.05516; intel/auto-round ``data_type/int.py``, ``quant_tensor_asym`` / ``quant_tensor_sym``) learns,
per weight, an offset ``V`` added before rounding and, per group, factors on the group's range:

    lo = min(w_g, 0) * min_factor        hi = max(w_g, 0) * max_factor
    scale = (hi - lo) / maxq             zero = clamp(round(-lo / scale), 0, maxq)        (asymmetric)
    scale = 2 * max(-lo, hi) / maxq      zero = (maxq + 1) / 2                            (symmetric)
    q = clamp(round(w / scale + V) + zero, 0, maxq)          out = scale * (q - zero)

``round`` is a straight-through estimator (identity gradient), and the scale is rounded to fp16 (as tritonq's
grid rule, ``grid_rule.minmax_scale_zero``, and auto-round's fp16 ``scale_dtype`` do) with an identity gradient.
With ``V = 0`` and both factors 1 the output is, bit for bit, the min-max grid's ``fake_quantize`` (RTN): every
fp32 operation is the grid rule's, in its order.

Differences from auto-round: the symmetric grid is tritonq's (unsigned codes around ``zero = 2^(b-1)``,
``scale = 2 absmax / maxq``), not auto-round's signed ``[-2^(b-1), 2^(b-1) - 1]`` codes with ``scale = absmax /
2^(b-1)``; the zero is clamped to ``[0, maxq]`` (a no-op while the factors stay in [0, 1], which the optimiser
enforces, as auto-round clamps them).

This module holds the PyTorch reference (:func:`signround_qdq_ref`, autograd through the formula above). The
Triton forward and straight-through backward sit beside it.
"""

from __future__ import annotations

import torch

from .grid_rule import MIN_SCALE


class _RoundSTE(torch.autograd.Function):
    """``round`` (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


class _Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (kept in fp32) forward, identity backward (no fp16 rounding of the gradient,
    which a plain ``.to(float16)`` in autograd would apply)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def signround_grid(w_lo: torch.Tensor, w_hi: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                   maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per group from the group's range ``w_lo = min(w_g)``, ``w_hi = max(w_g)`` and the factors
    (all ``[N, G]`` fp32); differentiable in the factors. Factors of 1 give ``minmax_scale_zero`` bit for bit."""
    lo = torch.clamp(w_lo, max=0.0) * min_factor
    hi = torch.clamp(w_hi, min=0.0) * max_factor
    scale = 2.0 * torch.maximum(-lo, hi) / maxq if sym else (hi - lo) / maxq
    scale = _Fp16STE.apply(torch.clamp(scale, min=MIN_SCALE))
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(_RoundSTE.apply(-lo / scale), 0, maxq)
    return scale, zero


def signround_qdq_ref(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                      group: int, maxq: int, sym: bool) -> torch.Tensor:
    """Quantize -> dequantize ``w`` (fp32 ``[N, K]``, constant) with rounding ``offsets`` ``[N, K]`` and grid factors
    ``[N, K // group]``; differentiable in ``offsets`` and both factors (straight-through rounding). ``group`` is the
    group width (``K`` for one group per row)."""
    n, k = w.shape
    grouped = w.view(n, k // group, group)
    w_lo, w_hi = torch.aminmax(grouped, dim=2)
    scale, zero = signround_grid(w_lo, w_hi, min_factor, max_factor, maxq, sym)
    s, z = scale[..., None], zero[..., None]
    q = torch.clamp(_RoundSTE.apply(grouped / s + offsets.view(n, k // group, group)) + z, 0, maxq)
    return ((q - z) * s).view(n, k)
