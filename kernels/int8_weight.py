"""Weight-only int8 linear: ``y = (x @ Wq^T) * scale + b`` with int8 ``Wq`` [N, K] and one scale per output row.

The matmul of a quantized lm_head (``--quantize-head int8``) and of int8 weights run without quantized inputs.
Neither path materialises the dequantized [N, K] matrix per call (for a 49k-row head that copy costs more than
the float matmul it replaces):

* :func:`int8_weight_linear_ref`: the PyTorch reference in fp32, ``ROWS`` output rows at a time, so at most a
  ``ROWS x K`` float block of the weight exists at once; the scale is applied to the output, not the weight;
* ``cpu_bf16``: PyTorch's CPU weight-only int8 op ``aten._weight_int8pack_mm`` (the op behind gpt-fast's
  ``WeightOnlyInt8Linear``), which takes bf16 activations and scales and returns bf16, cast back to ``x``'s
  dtype: the same precision contract as the int4 CPU op ``QuantLinear`` uses (relative error about 2^-9).

:func:`int8_weight_linear` dispatches; ``kernel`` forces one (tests, bench). A faster CPU kernel plugs in here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TritonqError

KERNELS = ("ref", "cpu_bf16")
ROWS = 256  # output rows per block of the reference: a 256 x K fp32 block stays in cache
CPU_K_MULTIPLE = 16  # aten._weight_int8pack_mm crashes (segfault, torch 2.13) on other in_features: checked first


def _check(x: Tensor, wq: Tensor, scale: Tensor) -> None:
    if wq.dtype != torch.int8 or wq.dim() != 2:
        raise TritonqError(f"int8_weight_linear: weight must be int8 [N, K], got {wq.dtype} {tuple(wq.shape)}")
    n, k = wq.shape
    if tuple(scale.shape) != (n,):
        raise TritonqError(f"int8_weight_linear: scale must be [{n}], got {tuple(scale.shape)}")
    if x.shape[-1] != k:
        raise TritonqError(f"int8_weight_linear: input has {x.shape[-1]} features, the weight {k}")


def int8_weight_linear_ref(x: Tensor, wq: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """Reference: fp32 accumulation, ``ROWS`` weight rows converted at a time; output in ``x``'s dtype."""
    _check(x, wq, scale)
    n, k = wq.shape
    x2 = x.reshape(-1, k).float()
    out = torch.cat([x2 @ wq[r:r + ROWS].float().t() for r in range(0, n, ROWS)], dim=1) * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def cpu_bf16_takes(in_features: int) -> bool:
    """Whether the CPU int8 op takes a weight of this many input features."""
    return in_features % CPU_K_MULTIPLE == 0


def int8_weight_linear_cpu_bf16(x: Tensor, wq: Tensor, scale: Tensor, bias: Tensor | None = None,
                                scale_bf16: Tensor | None = None) -> Tensor:
    """``aten._weight_int8pack_mm`` on bf16 inputs (CPU). ``scale_bf16``: the scale already in bf16 (a layer keeps
    one so that no cast runs per call)."""
    _check(x, wq, scale)
    if x.device.type != "cpu":
        raise TritonqError(f"int8_weight_linear: kernel 'cpu_bf16' runs on the CPU, the input is on {x.device}")
    n, k = wq.shape
    if not cpu_bf16_takes(k):
        raise TritonqError(f"int8_weight_linear: kernel 'cpu_bf16' needs in_features % {CPU_K_MULTIPLE} == 0, got {k}")
    s = scale.to(torch.bfloat16) if scale_bf16 is None else scale_bf16
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16).contiguous(), wq, s).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)


def int8_weight_linear(x: Tensor, wq: Tensor, scale: Tensor, bias: Tensor | None = None,
                       kernel: str | None = None, scale_bf16: Tensor | None = None) -> Tensor:
    """Weight-only int8 linear of ``x`` [..., K]; ``kernel`` None runs the reference (exact to fp32 rounding),
    ``"cpu_bf16"`` PyTorch's int8 CPU op (callers opt in, as ``load_packed_model`` does for the CPU)."""
    if kernel not in (None, *KERNELS):
        raise TritonqError(f"int8_weight_linear: unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "cpu_bf16":
        return int8_weight_linear_cpu_bf16(x, wq, scale, bias, scale_bf16)
    return int8_weight_linear_ref(x, wq, scale, bias)
