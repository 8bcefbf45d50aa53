"""Bit packing of unsigned codes into int32 words, in the directions the formats use.

Along the last dimension, LSB first and dense across word boundaries for widths that do not divide 32 (as
compressed-tensors' ``pack_to_int32``); along K for GPTQ ``qweight`` (the int4 kernel layout); along N
with AutoAWQ's interleave (``awq/utils/packing_utils.py``: nibble i holds column 8c + [0,2,4,6,1,3,5,7][i]).
Layouts: ``../shared/docs/formats_and_ecosystem.md`` §1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import TritonqError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]


def pack_last(values: Tensor, bits: int) -> Tensor:
    """Pack unsigned ints [R, C] < 2^bits into int32 [R, ceil(C*bits/32)], element i at bit i*bits."""
    rows, cols = values.shape
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 2**bits):
        raise TritonqError(f"cannot pack values outside 0..{2**bits - 1} into {bits} bits; clamp them first")
    v = values.to(torch.int64)
    if 32 % bits == 0:
        per = 32 // bits
        pad = (-cols) % per
        v = torch.nn.functional.pad(v, (0, pad)).reshape(rows, -1, per)
        shifts = torch.arange(per, dtype=torch.int64) * bits
        words = (v << shifts).sum(dim=-1)
    else:  # dense bit stream, words may split an element (3, 5, 6, 7 bits)
        bit = (v.unsqueeze(-1) >> torch.arange(bits)) & 1  # [R, C, b]
        stream = bit.reshape(rows, cols * bits)
        stream = torch.nn.functional.pad(stream, (0, (-stream.shape[1]) % 32)).reshape(rows, -1, 32)
        words = (stream << torch.arange(32, dtype=torch.int64)).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement view of uint32
    return words.to(torch.int32)


def unpack_last(words: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_last`: int32 [R, W] -> uint8-valued int64 [R, cols]."""
    if words.dtype != torch.int32:
        raise TritonqError(f"packed tensors must be int32, got {words.dtype}")
    rows, nwords = words.shape
    if nwords * 32 < cols * bits:
        raise TritonqError(f"{nwords} int32 words cannot hold {cols} values of {bits} bits")
    w = words.to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:
        per = 32 // bits
        vals = (w.unsqueeze(-1) >> (torch.arange(per, dtype=torch.int64) * bits)) & (2**bits - 1)
        return vals.reshape(rows, nwords * per)[:, :cols]
    stream = ((w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(rows, nwords * 32)
    bit = stream[:, : cols * bits].reshape(rows, cols, bits)
    return (bit << torch.arange(bits, dtype=torch.int64)).sum(dim=-1)


def pack_k(codes_kn: Tensor, bits: int) -> Tensor:
    """Codes [K, N] packed along K into int32 [K*b/32, N] (GPTQ ``qweight``, the kernel layout)."""
    if bits == 4:
        from ...kernels.pack import pack_int4

        return pack_int4(codes_kn)
    return pack_last(codes_kn.t(), bits).t().contiguous()


def unpack_k(qweight: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_k`: int32 [K*b/32, N] -> int64 [K, N]."""
    if bits == 4 and qweight.shape[0] * 8 == k:
        from ...kernels.pack import unpack_int4

        return unpack_int4(qweight).to(torch.int64)
    return unpack_last(qweight.t(), bits, k).t()


def awq_pack(values_kn: Tensor) -> Tensor:
    """4-bit values [R, N] packed along N with AutoAWQ's interleave into int32 [R, N/8]."""
    rows, n = values_kn.shape
    if n % 8:
        raise TritonqError(f"AWQ packs 8 output columns per word; out_features {n} is not a multiple of 8")
    order = torch.tensor(AWQ_ORDER)
    v = values_kn.reshape(rows, n // 8, 8)[:, :, order]  # nibble i <- column 8c + AWQ_ORDER[i]
    return pack_last(v.reshape(rows, n), 4)


def awq_unpack(words: Tensor, n: int) -> Tensor:
    """Inverse of :func:`awq_pack`: int32 [R, N/8] -> int64 [R, N]."""
    rows = words.shape[0]
    v = unpack_last(words, 4, n).reshape(rows, n // 8, 8)
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))  # == [0, 4, 1, 5, 2, 6, 3, 7]
    return v[:, :, inverse].reshape(rows, n)
