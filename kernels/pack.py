"""Int4 pack/unpack along K: the layout every tritonq int4 kernel reads.

Layout (GPTQ's ``qweight``; the transpose of compressed-tensors' ``weight_packed``): a code matrix
``q`` of shape [K, N] with entries in 0..15 becomes int32 ``[K // 8, N]`` where nibble ``j`` (bits
``4j..4j+3``, least-significant first) of word ``[r, n]`` holds ``q[8r + j, n]``. Packing along K with
N contiguous lets a GEMV read consecutive words along N with 128-bit loads (GemLite ``bitpack.py``
packs the same way, then transposes to (K/8, N); see docs/kernels_perf.md §1).

Both functions are plain PyTorch references; no Triton kernel is needed for a one-off conversion.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TritonqError

__all__ = ["pack_int4", "unpack_int4"]

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j sits at bits 4j..4j+3


def pack_int4(codes: Tensor) -> Tensor:
    """Pack unsigned 4-bit codes [K, N] (any integer dtype, values 0..15) into int32 [K // 8, N].

    Raises :class:`TritonqError` when the input is not 2-D, K is not a multiple of 8, the dtype is not
    an integer type, or a code lies outside 0..15 (an unclamped code would wrap into its neighbour,
    the GPTQ v1 overflow described in docs/formats_and_ecosystem.md §1.1).
    """
    if codes.dim() != 2:
        raise TritonqError(f"pack_int4 expects a 2-D [K, N] code matrix, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise TritonqError(f"pack_int4 expects integer codes, got {codes.dtype}; round and cast first")
    K, N = codes.shape
    if K % 8 != 0:
        raise TritonqError(f"pack_int4 needs K (rows) to be a multiple of 8, got K={K}; "
                           "pad the input features")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise TritonqError(
            f"pack_int4 codes must lie in 0..15, got range [{int(codes.min())}, {int(codes.max())}]; "
            "clamp the codes before packing")
    q = codes.to(torch.int32).reshape(K // 8, 8, N)
    shifts = _SHIFTS.to(q.device).view(1, 8, 1)
    # The nibbles occupy disjoint bits, so a sum equals a bitwise OR; nibble 7 may set the sign bit,
    # and int32 wrap-around in the sum gives the same two's-complement bit pattern.
    return (q << shifts).sum(dim=1, dtype=torch.int32)


def unpack_int4(qweight: Tensor) -> Tensor:
    """Unpack int32 [K // 8, N] into uint8 codes [K, N] (the inverse of :func:`pack_int4`)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise TritonqError(
            f"unpack_int4 expects an int32 [K // 8, N] tensor, got {qweight.dtype} "
            f"of shape {tuple(qweight.shape)}")
    R, N = qweight.shape
    shifts = _SHIFTS.to(qweight.device).view(1, 8, 1)
    q = (qweight.unsqueeze(1) >> shifts) & 0xF  # arithmetic shift is fine: the mask drops sign bits
    return q.reshape(R * 8, N).to(torch.uint8)
