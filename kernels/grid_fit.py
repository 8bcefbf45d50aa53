"""The min-max grid fit and quantize -> dequantize inside Triton kernels, written once: ``@triton.jit`` device
helpers that the GPTQ block kernel and the AWQ search and clip kernels call (compiled into each caller, so
this module holds no kernel of its own and has no catalog entry).

They transcribe :func:`.grid_rule.minmax_scale_zero` and :func:`.grid_rule.fake_quantize` one IEEE fp32
operation at a time: divisions are ``div_rn`` (correctly rounded, as PyTorch's), no product is followed by an
add the compiler could fuse, and rounding is half to even as ``torch.round``. ``tests/test_awq_kernels.py``
and ``tests/test_kernels.py`` check the kernels' grids and weights bit for bit against the host functions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_half_even(x):
    """``torch.round``: to the nearest integer, ties to even (fp32)."""
    r = tl.floor(x + 0.5)
    return tl.where(((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def minmax_fit(lo, hi, maxq, min_scale, SYM: tl.constexpr):
    """``(scale, zero)`` of the grid for the ranges ``[lo, hi]`` (fp32 vectors): the rule of
    :func:`tritonq.kernels.grid_rule.minmax_scale_zero` (zero kept in range, fp16-exact scale >= ``min_scale``)."""
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    qmax = maxq.to(tl.float32)
    if SYM:
        scale = tl.math.div_rn(2.0 * tl.maximum(-lo, hi), qmax)
    else:
        scale = tl.math.div_rn(hi - lo, qmax)
    scale = tl.maximum(scale, min_scale).to(tl.float16).to(tl.float32)
    if SYM:
        zero = tl.zeros_like(scale) + ((maxq + 1) // 2).to(tl.float32)
    else:
        zero = tl.minimum(tl.maximum(round_half_even(-tl.math.div_rn(lo, scale)), 0.0), qmax)
    return scale, zero


@triton.jit
def fake_quantize(w, scale, zero, maxq):
    """``scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)``: :func:`tritonq.kernels.grid_rule.fake_quantize`
    (``scale``/``zero`` broadcast against ``w``)."""
    code = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(w, scale)) + zero, 0.0), maxq.to(tl.float32))
    return scale * (code - zero)
