"""W4A16 dequant-matmul ``y = x @ W + bias`` with packed int4 W: the PyTorch reference, Triton kernels
(a split-K GEMV for decoding, a tiled GEMM for prefill), their launcher and the dispatch.

Arguments (the contract every caller codes against)
---------------------------------------------------
- ``x``: [..., K] fp16/bf16 (fp32 is accepted by the reference path only); output [..., N] in x's dtype.
- ``qweight``: int32 [K // 8, N], packed along K: nibble ``j`` (bits 4j..4j+3, LSB first) of word
  ``[r, n]`` holds the unsigned code of input row ``8r + j`` (GPTQ's ``qweight``; the transpose of
  compressed-tensors' ``weight_packed``; see :mod:`tritonq.kernels.pack`).
- ``scales``: [G, N] fp16/bf16 (fp32 allowed), ``G = K // group_size``; ``group_size == K`` (or -1)
  means per channel. ``zeros``: [G, N] floats holding the integer zero point z in 0..15, or ``None``
  for the symmetric grid (z = 8).
- ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = k // group_size``, or ``g = g_idx[k]``
  when ``g_idx`` (int32 [K], act-order) is given; then ``G`` must be ``ceil(K / group_size)``.
- ``force``: ``None`` (CUDA tensors -> Triton kernels, anything else -> reference), ``"ref"``,
  ``"gemv"`` or ``"gemm"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine.errors import TritonqError
from .pack import unpack_int4

__all__ = ["dequant_matmul", "dequant_matmul_ref", "dequantize_int4"]

_FORCE = (None, "ref", "gemv", "gemm")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_args(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                g_idx: Tensor | None, bias: Tensor | None) -> int:
    """Validate shapes, dtypes and devices; return the effective group size (per channel -> K)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise TritonqError(f"qweight must be int32 [K // 8, N], got {qweight.dtype} of shape "
                           f"{tuple(qweight.shape)}; pack codes with tritonq.kernels.pack.pack_int4")
    K = x.shape[-1]
    N = qweight.shape[1]
    if K % 8 != 0:
        raise TritonqError(f"K (x.shape[-1]) must be a multiple of 8 for int4 packing, got K={K}; "
                           "pad the input features to a multiple of 8")
    if qweight.shape[0] * 8 != K:
        raise TritonqError(f"qweight has {qweight.shape[0]} packed rows = {qweight.shape[0] * 8} inputs, "
                           f"but x has K={K}; qweight must be [K // 8, N] packed along K")
    if x.dtype not in _FLOATS:
        raise TritonqError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    gs = K if group_size in (-1, 0) else group_size
    if gs <= 0 or gs % 8 != 0:
        raise TritonqError(f"group_size must be a positive multiple of 8, or -1 (per channel), "
                           f"got {group_size}")
    if g_idx is None:
        if K % gs != 0:
            raise TritonqError(f"group_size={gs} does not divide K={K}; without g_idx groups must tile K "
                               "exactly (use group_size=-1 for per channel)")
        G = K // gs
    else:
        G = -(-K // gs)
        if g_idx.shape != (K,) or g_idx.dtype not in (torch.int32, torch.int64):
            raise TritonqError(f"g_idx must be an int32 tensor of shape ({K},), got {g_idx.dtype} "
                               f"{tuple(g_idx.shape)}")
    if scales.dim() != 2 or tuple(scales.shape) != (G, N) or scales.dtype not in _FLOATS:
        raise TritonqError(f"scales must be a float [G, N] = [{G}, {N}] tensor for K={K}, group_size={gs}, "
                           f"got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (G, N):
        raise TritonqError(f"zeros must have the shape of scales [{G}, {N}] (or be None for symmetric), "
                           f"got {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise TritonqError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("g_idx", g_idx),
                    ("bias", bias)):
        if t is not None and t.device != x.device:
            raise TritonqError(f"{name} is on {t.device} but x is on {x.device}; "
                               "move all tensors to one device")
    return gs


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                    g_idx: Tensor | None = None) -> Tensor:
    """Dense fp32 weight [K, N] from the packed form: ``s[g, n] * (q[k, n] - z[g, n])``."""
    q = unpack_int4(qweight).float()
    K = q.shape[0]
    gs = K if group_size in (-1, 0) else group_size
    g = torch.arange(K, device=q.device) // gs if g_idx is None else g_idx.long()
    s = scales.float()[g]
    z = zeros.float()[g] if zeros is not None else 8.0
    return (q - z) * s


def dequant_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, *,
                       group_size: int, g_idx: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Reference: dequantize to fp32, matmul in fp32, add bias, cast to x's dtype."""
    _check_args(x, qweight, scales, zeros, group_size, g_idx, bias)
    w = dequantize_int4(qweight, scales, zeros, group_size, g_idx)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, *, group_size: int,
                   g_idx: Tensor | None = None, bias: Tensor | None = None,
                   force: str | None = None) -> Tensor:
    """``x @ dequantize(qweight, scales, zeros) + bias``; dispatches to a Triton kernel or the reference.

    ``force=None`` runs the Triton kernels for CUDA tensors (GEMV for at most ``GEMV_MAX_M`` rows, GEMM
    above) and the reference otherwise; ``"ref"``, ``"gemv"``, ``"gemm"`` pick one path.
    """
    if force not in _FORCE:
        raise TritonqError(f"force must be one of {_FORCE}, got {force!r}")
    _check_args(x, qweight, scales, zeros, group_size, g_idx, bias)
    if force == "ref" or (force is None and not x.is_cuda):
        return dequant_matmul_ref(x, qweight, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias)
    raise TritonqError("the Triton kernels are not in this build yet; use force='ref'")
