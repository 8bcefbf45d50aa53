"""The format-neutral records every writer and reader goes through, and the checks they share.

:class:`QuantizedWeight` is one quantized linear as integers (unsigned codes, fp32 scale and zero per
group, g_idx); every on-disk layout is written from it and read back into it. The runtime layouts
(:class:`PackedLinear` for the int4 dequant-matmul, :class:`PackedInt8Linear` for W8A8, :class:`DenseLinear`
for grids no packed kernel serves) are what the serving path builds from a record. ``quant_params.safetensors``
(the fake output's grid parameters) is described here too, with the per-layer grid it records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import TritonqError
from ..grid import GridSpec, codes_of, dequantize

QUANT_PARAMS = "quant_params.safetensors"
GRID_LEAF = "grid"  # quant_params tensor ``<name>.grid``: int32 [bits, group_size, sym] (absent in old files)


@dataclass
class QuantizedWeight:
    """Format-neutral integer form of one linear: ``w = scale[:, g_idx] * (codes - zero[:, g_idx])``."""

    codes: Tensor  # uint8 [N, K], unsigned in [0, 2^b - 1]
    scale: Tensor  # fp32 [N, G]
    zero: Tensor  # fp32 [N, G], integer valued, unsigned
    g_idx: Tensor  # int32 [K]
    bias: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.g_idx)

    @classmethod
    def from_grid(
        cls,
        name: str,
        weight: Tensor,
        scale: Tensor,
        zero: Tensor,
        g_idx: Tensor,
        spec: GridSpec,
        bias: Tensor | None = None,
    ) -> QuantizedWeight:
        """The record of a float ``weight`` [N, K] that lies on the grid ``(scale, zero, g_idx)``.

        Codes are ``clamp(round(w / scale) + zero, 0, maxq)``; they are accepted only if dequantizing them
        and casting to ``weight.dtype`` gives ``weight`` bit for bit (a bf16 or fp16 model stores the
        dtype's rounding of the fp32 grid point, which this reproduces exactly). Anything else means the
        weights are not the ones the grid was written with, and we refuse rather than guess.
        """
        if weight.dim() != 2:
            raise TritonqError(f"{name}: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
        n, k = weight.shape
        q = cls(torch.zeros(n, k, dtype=torch.uint8), scale.float(), zero.float(), g_idx.to(torch.int32), bias)
        check_layer(name, q, spec)  # shapes first, so the gathers below cannot fail obscurely
        q.codes = codes_of(weight, q.scale, q.zero, q.g_idx, spec.maxq)
        back = q.dequantize().to(weight.dtype)
        if not torch.equal(back, weight):
            differ = back != weight
            raise TritonqError(
                f"{name}: {int(differ.sum())} of {weight.numel()} float weights are not points of the grid in "
                f"{QUANT_PARAMS} (e.g. row {int(differ.nonzero()[0, 0])}); the directory was modified after "
                "'tritonq quantize' or not written by it. Re-run 'tritonq quantize' to get a packable output"
            )
        return q


@dataclass
class PackedLinear:
    """Runtime layout of the int4 dequant-matmul kernel (``kernels/dequant_matmul.py``).

    ``qweight`` int32 [K // 8, N]: nibble j of word [r, n] is the code of row 8r + j (``pack_int4``);
    ``scales`` [G, N]; ``zeros`` [G, N] float (unsigned zero points) or None for symmetric grids
    (zero = 8); ``g_idx`` [K] int32 or None when it is ``k // group_size``.
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    g_idx: Tensor | None
    group_size: int  # effective group size (K for per channel)
    in_features: int
    out_features: int
    bias: Tensor | None = None


@dataclass
class PackedInt8Linear:
    """Runtime layout of the W8A8 GEMM (``kernels/int8_matmul.py``): ``weight`` int8 [N, K] (symmetric codes,
    ``w = scale[n] * weight[n, k]``), ``scale`` fp32 [N] per output channel."""

    weight: Tensor
    scale: Tensor
    in_features: int
    out_features: int
    bias: Tensor | None = None


@dataclass
class DenseLinear:
    """Runtime fallback for a grid no packed kernel serves (e.g. 8-bit groups of a mixed-precision run):
    the record dequantized once at load, ``weight`` fp32 [N, K], run as a plain float linear."""

    weight: Tensor
    in_features: int
    out_features: int
    bias: Tensor | None = None


# ---------------------------------------------------------------------------------------------------
# rules shared by writers and readers


def check_layer(name: str, q: QuantizedWeight, spec: GridSpec) -> None:
    """Shapes and ranges of one record; a clear error naming the layer and the broken rule."""
    if q.codes.dim() != 2:
        raise TritonqError(f"{name}: codes must be 2-D [N, K], got shape {tuple(q.codes.shape)}")
    n, k = q.codes.shape
    g = spec.effective_group(k)
    if k % g:
        raise TritonqError(f"{name}: group size {g} does not divide in_features {k}")
    groups = k // g
    if tuple(q.scale.shape) != (n, groups) or tuple(q.zero.shape) != (n, groups):
        raise TritonqError(
            f"{name}: scale/zero must be [{n}, {groups}] for weight [{n}, {k}] and group size "
            f"{spec.group_size}, got {tuple(q.scale.shape)} / {tuple(q.zero.shape)}"
        )
    if tuple(q.g_idx.shape) != (k,):
        raise TritonqError(f"{name}: g_idx must have {k} entries, got shape {tuple(q.g_idx.shape)}")
    if k and (int(q.g_idx.min()) < 0 or int(q.g_idx.max()) >= groups):
        raise TritonqError(f"{name}: g_idx values must lie in 0..{groups - 1}")
    maxq = spec.maxq
    if q.codes.numel() and int(q.codes.max()) > maxq:
        raise TritonqError(f"{name}: codes exceed {maxq}, the largest {spec.bits}-bit code")
    if q.zero.numel() and (float(q.zero.min()) < 0 or float(q.zero.max()) > maxq):
        raise TritonqError(f"{name}: zero points must lie in 0..{maxq}")
    if not torch.equal(q.zero, q.zero.round()):
        raise TritonqError(f"{name}: zero points must be integers")
    if not torch.isfinite(q.scale).all() or (q.scale <= 0).any():
        raise TritonqError(f"{name}: scales must be finite and positive")


def default_g_idx(k: int, g: int) -> Tensor:
    """``k // g`` for every input column: the g_idx of a run without group act-order."""
    return torch.arange(k, dtype=torch.int32) // g


def is_default_g_idx(g_idx: Tensor, g: int) -> bool:
    return bool(torch.equal(g_idx.to(torch.int32), default_g_idx(g_idx.numel(), g)))


def stored_scale(name: str, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` cast to the dtype a format stores it in, refusing a cast that would change a value."""
    stored = scale.to(dtype).contiguous()
    if not torch.equal(stored.float(), scale.float()):
        raise TritonqError(
            f"{name}: a scale is not representable in {str(dtype).replace('torch.', '')}, the dtype this format "
            "stores scales in; tritonq's grid rounds scales to fp16, so these scales were not written by it"
        )
    return stored


def signed(values: Tensor, bits: int) -> Tensor:
    """Unsigned codes or zero points as compressed-tensors' signed int8 ``v - 2^(b-1)``."""
    return (values.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def unsigned(values: Tensor, bits: int) -> Tensor:
    return values.to(torch.int16) + 2 ** (bits - 1)


def model_dtype(config: dict) -> torch.dtype:
    """The float dtype a ``config.json`` declares (float32 when it says nothing usable)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def grid_tensor(spec: GridSpec) -> Tensor:
    """The per-layer grid as ``quant_params.safetensors`` records it: int32 [bits, group_size, sym]."""
    return torch.tensor([spec.bits, spec.group_size, int(spec.sym)], dtype=torch.int32)


def grid_from_tensor(name: str, t: Tensor, run: GridSpec) -> GridSpec:
    """Inverse of :func:`grid_tensor`; the run's search settings (mse ...) are kept, they do not change a layout."""
    if t.dtype != torch.int32 or tuple(t.shape) != (3,):
        raise TritonqError(f"{name}.{GRID_LEAF} must be int32 [bits, group_size, sym], got {t.dtype} {tuple(t.shape)}")
    bits, group_size, sym = (int(v) for v in t.tolist())
    return GridSpec(bits=bits, group_size=group_size, sym=bool(sym), mse=run.mse)


def layout_key(spec: GridSpec) -> tuple[int, int, bool]:
    """What a writer must hold of a grid (bits, group size, symmetry); search settings do not matter."""
    return spec.bits, spec.group_size, spec.sym
