"""From records to the layouts the serving path runs: int4 dequant-matmul, W8A8 int8, or a dense fallback."""

from __future__ import annotations

import os

import torch

from ..grid import GridSpec
from .records import DenseLinear, PackedInt8Linear, PackedLinear, QuantizedWeight, is_default_g_idx, signed
from .registry import read_packed

RuntimeLinear = PackedLinear | PackedInt8Linear | DenseLinear


def to_runtime(q: QuantizedWeight, spec: GridSpec) -> RuntimeLinear:
    """The runtime layout of one record: W8A8 int8 for 8-bit symmetric per-channel grids, the int4
    dequant-matmul layout for 4-bit grids, and for any other grid (e.g. the 8-bit groups of a mixed-precision
    run) the weight dequantized once, run as a dense float linear."""
    from ...kernels import dequant_matmul
    from ...kernels.configs import check_limits
    from ...kernels.pack import pack_int4

    n, k = q.shape
    if spec.bits == 8 and spec.sym and spec.group_size == -1:
        return PackedInt8Linear(signed(q.codes, 8).to(torch.int8), q.scale.reshape(n).float(), k, n, q.bias)
    if spec.bits != 4:
        return DenseLinear(q.dequantize(), k, n, q.bias)
    check_limits("dequant_matmul", dequant_matmul.LIMITS, bits=spec.bits, group_size=spec.group_size, in_features=k)
    g = spec.effective_group(k)
    sym = bool((q.zero == 8).all())
    return PackedLinear(
        qweight=pack_int4(q.codes.t().contiguous()),
        scales=q.scale.t().contiguous(),
        zeros=None if sym else q.zero.t().contiguous(),
        g_idx=None if is_default_g_idx(q.g_idx, g) else q.g_idx.to(torch.int32),
        group_size=g,
        in_features=k,
        out_features=n,
        bias=q.bias,
    )


def load_packed_layers(directory: str | os.PathLike) -> dict[str, RuntimeLinear]:
    """Every quantized linear of a packed checkpoint (any supported format) in its runtime layout."""
    return {name: to_runtime(q, spec) for name, spec, q in read_packed(directory)}
