"""The one reader and writer of every packed checkpoint layout tritonq knows: one class per format.

A tritonq output directory (``tritonq quantize --format fake``) holds float weights that lie exactly
on the grid plus ``quant_params.safetensors`` (scale, zero, g_idx per quantized linear). This module
turns such a directory (or the integer records of a run still in memory) into the integer layouts the
ecosystem loads, and reads those layouts back, including checkpoints written by llm-compressor,
GPTQModel/AutoGPTQ and AutoAWQ. Each layout is one :class:`PackedFormat` subclass with the same five
parts (``check``, ``config``, ``write``, ``read``, ``recognizes``), collected in :data:`FORMATS`, the shape
of gpt-fast's ``*QuantHandler`` classes (pytorch-labs/gpt-fast ``quantize.py``):

* ``compressed-tensors`` ``pack-quantized`` (default; llm-compressor's output, vLLM's native format):
  ``weight_packed`` int32 [N, K*b/32] packed along K, ``weight_scale`` [N, G], ``weight_shape``,
  ``weight_zero_point`` int32 [N*b/32, G] packed along N (asymmetric only; signed ``z - 2^(b-1)``),
  ``weight_g_idx`` [K] for group act-order only. Written and read with the compressed-tensors library
  itself (``PackedQuantizationCompressor.compress``, ``pack_to_int32``/``unpack_from_int32``, and its
  ``QuantizationConfig`` serialised as ``ModelCompressor.update_config`` does), so our files follow the
  library. Source read: vllm-project/compressed-tensors ``compressors/pack_quantized/{base,helpers}.py``,
  ``compressors/model_compressors/model_compressor.py``, ``quantization/{quant_args,quant_scheme,quant_config}.py``.
* ``gptq`` / ``gptq_v2``: ``qweight`` int32 [K*b/32, N] packed along K, ``qzeros`` int32 [G, N*b/32]
  packed along N (v1 stores ``z - 1``, v2 stores ``z``), ``scales`` fp16 [G, N], ``g_idx`` int32 [K].
  Sources: ModelCloud/GPTQModel ``nn_modules/qlinear/__init__.py`` (``pack_block``), AutoGPTQ
  ``qlinear_cuda_old.py`` (``zeros -= 1``).
* ``awq`` (AutoAWQ GEMM): ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along N with
  the interleaved nibble order ``[0, 2, 4, 6, 1, 3, 5, 7]``, ``scales`` fp16 [G, N], no g_idx.
  Source: casper-hansen/AutoAWQ ``awq/modules/linear/gemm.py``, ``awq/utils/packing_utils.py``.

Bit layouts are summarised in ``../shared/docs/formats_and_ecosystem.md`` §1. Every layout is written
and read through one format-neutral record, :class:`QuantizedWeight` (unsigned codes, fp32 scale and
zero per group, g_idx), described by the grid's own :class:`~tritonq.engine.grid.GridSpec`. Nothing is
accepted within a tolerance: the codes of a directory are rebuilt from its grid and must dequantize to
its float weights bit for bit, and every writer stores scales only in a dtype that holds them exactly.
The serving path uses :class:`PackedLinear`, the runtime layout of ``kernels/dequant_matmul.py``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ...errors import TritonqError, warn
from ..grid import GridSpec, codes_of, dequantize
from ..outputs import atomic_output_dir

DEFAULT_FORMAT = "compressed-tensors"
QUANT_JSON = "quantization.json"
QUANT_PARAMS = "quant_params.safetensors"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SKIP_COPY = {QUANT_JSON, QUANT_PARAMS, "config.json", *_WEIGHT_FILES}


# ---------------------------------------------------------------------------------------------------
# records


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
        _check_layer(name, q, spec)  # shapes first, so the gathers below cannot fail obscurely
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


# ---------------------------------------------------------------------------------------------------
# bit packing along the last dimension (LSB first, dense across words as compressed-tensors' packer)


def _pack_last(values: Tensor, bits: int) -> Tensor:
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


def _unpack_last(words: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`_pack_last`: int32 [R, W] -> uint8-valued int64 [R, cols]."""
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


def _pack_k(codes_kn: Tensor, bits: int) -> Tensor:
    """Codes [K, N] packed along K into int32 [K*b/32, N] (GPTQ ``qweight``, the kernel layout)."""
    if bits == 4:
        from ...kernels.pack import pack_int4

        return pack_int4(codes_kn)
    return _pack_last(codes_kn.t(), bits).t().contiguous()


def _unpack_k(qweight: Tensor, bits: int, k: int) -> Tensor:
    if bits == 4 and qweight.shape[0] * 8 == k:
        from ...kernels.pack import unpack_int4

        return unpack_int4(qweight).to(torch.int64)
    return _unpack_last(qweight.t(), bits, k).t()


def awq_pack(values_kn: Tensor) -> Tensor:
    """4-bit values [R, N] packed along N with AutoAWQ's interleave into int32 [R, N/8]."""
    rows, n = values_kn.shape
    if n % 8:
        raise TritonqError(f"AWQ packs 8 output columns per word; out_features {n} is not a multiple of 8")
    order = torch.tensor(AWQ_ORDER)
    v = values_kn.reshape(rows, n // 8, 8)[:, :, order]  # nibble i <- column 8c + AWQ_ORDER[i]
    return _pack_last(v.reshape(rows, n), 4)


def awq_unpack(words: Tensor, n: int) -> Tensor:
    """Inverse of :func:`awq_pack`: int32 [R, N/8] -> int64 [R, N]."""
    rows = words.shape[0]
    v = _unpack_last(words, 4, n).reshape(rows, n // 8, 8)
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))  # == [0, 4, 1, 5, 2, 6, 3, 7]
    return v[:, :, inverse].reshape(rows, n)


# ---------------------------------------------------------------------------------------------------
# tensor access over single-file or sharded safetensors


class TensorStore:
    """Lazy read access to the tensors of a checkpoint directory (one file or shards + index)."""

    def __init__(self, directory: str | os.PathLike, filename: str = "model.safetensors") -> None:
        self.dir = Path(directory)
        index = self.dir / f"{filename}.index.json"
        single = self.dir / filename
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
        elif index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.dir / v for k, v in weight_map.items()}
            files = set(self._where.values())
        else:
            raise TritonqError(
                f"{self.dir} has no {filename} (nor a sharded index); is it a checkpoint directory?"
            )
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}
        if not self._where:
            for f, h in self._handles.items():
                self._where.update(dict.fromkeys(h.keys(), f))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, what: str = "") -> Tensor:
        if name not in self._where:
            hint = f" ({what})" if what else ""
            raise TritonqError(
                f"tensor {name!r} is missing from {self.dir}{hint}; the checkpoint is incomplete"
            )
        return self._handles[self._where[name]].get_tensor(name)

    def maybe(self, name: str) -> Tensor | None:
        return self.get(name) if name in self._where else None


# ---------------------------------------------------------------------------------------------------
# validation shared by writers and readers


def _check_layer(name: str, q: QuantizedWeight, spec: GridSpec) -> None:
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


def _default_g_idx(k: int, g: int) -> Tensor:
    return torch.arange(k, dtype=torch.int32) // g


def _is_default_g_idx(g_idx: Tensor, g: int) -> bool:
    return bool(torch.equal(g_idx.to(torch.int32), _default_g_idx(g_idx.numel(), g)))


def _stored_scale(name: str, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``scale`` cast to the dtype a format stores it in, refusing a cast that would change a value."""
    stored = scale.to(dtype).contiguous()
    if not torch.equal(stored.float(), scale.float()):
        raise TritonqError(
            f"{name}: a scale is not representable in {str(dtype).replace('torch.', '')}, the dtype this format "
            "stores scales in; tritonq's grid rounds scales to fp16, so these scales were not written by it"
        )
    return stored


def _signed(values: Tensor, bits: int) -> Tensor:
    """Unsigned codes or zero points as compressed-tensors' signed int8 ``v - 2^(b-1)``."""
    return (values.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def _unsigned(values: Tensor, bits: int) -> Tensor:
    return values.to(torch.int16) + 2 ** (bits - 1)


def _method(qcfg: dict) -> str:
    """``quant_method`` of a config, lower case; CT configs before the key existed are recognised by shape."""
    default = "compressed-tensors" if "config_groups" in qcfg else ""
    return str(qcfg.get("quant_method") or default).lower()


def _matches(name: str, targets: Iterable[str], *, linear: bool) -> bool:
    """compressed-tensors target matching: a module name, a ``re:`` regex, or (``linear``) the class Linear."""
    for t in targets:
        if (linear and t == "Linear") or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


@functools.cache
def _compressed_tensors() -> SimpleNamespace:
    """The parts of compressed-tensors we use, imported on first use (importing tritonq stays cheap)."""
    try:
        import compressed_tensors
        from compressed_tensors.base import QUANTIZATION_METHOD
        from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise TritonqError(
            f"the compressed-tensors format needs the compressed-tensors library ({exc}); "
            "run 'pip install \"compressed-tensors>=0.18\"' or choose --format gptq_v2"
        ) from None
    return SimpleNamespace(
        version=compressed_tensors.__version__,
        method=QUANTIZATION_METHOD,
        compressor=PackedQuantizationCompressor,
        int_compressor=IntQuantizationCompressor,
        pack=pack_to_int32,
        unpack=unpack_from_int32,
        Args=QuantizationArgs,
        Config=QuantizationConfig,
        Scheme=QuantizationScheme,
    )


# ---------------------------------------------------------------------------------------------------
# the formats


def _qweight_layers(store: TensorStore) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """``(name, qweight, scales, qzeros)`` of every layer stored in the GPTQ / AWQ tensor naming."""
    for key in store.keys():
        if key.endswith(".qweight"):
            name = key[: -len(".qweight")]
            yield name, store.get(key), store.get(f"{name}.scales", "scales"), store.get(f"{name}.qzeros", "qzeros")


class PackedFormat:
    """One on-disk layout: its rules, its ``quantization_config``, and the tensors of one linear.

    Subclasses set ``name`` (the ``--format`` value) and ``tensor_names`` (leaf names of the packed tensors
    of one linear, so the float tensors of a checkpoint can be told apart) and implement the methods.
    """

    name: ClassVar[str]
    tensor_names: ClassVar[tuple[str, ...]]

    def check(self, spec: GridSpec) -> None:
        """Refuse a grid this layout cannot hold, before any work; the message names the fix."""

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype scales are stored in (fp16 is the GPTQ and AWQ convention, formats doc §1.5)."""
        return torch.float16

    def config(
        self,
        spec: GridSpec,
        *,
        model_dtype: torch.dtype,
        ignore: list[str],
        act_order: bool,
        desc_act: bool,
        version: str,
    ) -> dict:
        """The ``quantization_config`` block of ``config.json``.

        ``ignore``: linears left in float; ``act_order``: columns were reordered for the solve (static
        groups, monotonic g_idx); ``desc_act``: some g_idx is non-monotonic (group act-order).
        """
        raise NotImplementedError

    def write(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
        """The packed tensors of one linear, keyed ``<name>.<leaf>``; refuses records the layout cannot hold."""
        raise NotImplementedError

    def recognizes(self, qcfg: dict) -> bool:
        """Whether a checkpoint's ``quantization_config`` is this layout (raises for a known-unsupported variant)."""
        raise NotImplementedError

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        """Every packed linear of a checkpoint as ``(name, grid, record)``, validated, in file order."""
        raise NotImplementedError

    def side_files(self, qcfg: dict) -> dict[str, dict]:
        """Extra JSON files written beside ``config.json`` (file name -> content)."""
        return {}


class CompressedTensorsFormat(PackedFormat):
    """compressed-tensors ``pack-quantized``, through the compressed-tensors library (formats doc §1.3).

    With activation quantization (``quantization.json`` ``activations``) every config group also carries
    ``input_activations`` (dynamic, per token or per tensor), and W8A8 - 8-bit symmetric per-channel weights
    with 8-bit activations - is written as llm-compressor writes it for vLLM's int8 kernels:
    ``int-quantized``, an int8 ``weight`` [N, K] and ``weight_scale`` [N, 1], through the library's
    ``IntQuantizationCompressor``.

    The library decides the layout: ``PackedQuantizationCompressor.compress`` quantizes the grid point of
    every weight with our scale and zero point and packs it, and we check that it recovered our codes.
    Group act-order is the exception: compressed-tensors >= 0.19 has no g_idx in its compressor (it always
    forms contiguous groups) nor ``actorder='group'`` in its schema, so such layers are packed with the
    library's own ``pack_to_int32`` and the config says ``actorder: "group"`` for vLLM, which still reads it.
    """

    name = "compressed-tensors"
    tensor_names = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight")

    def check(self, spec: GridSpec) -> None:
        _compressed_tensors()  # a missing library fails here, before any weight is read

    def scale_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        # CT stores scales in the model dtype; our scales are fp16 values, which bf16 cannot all hold,
        # so a bf16 model keeps fp16 scales and declares them (QuantizationArgs.scale_dtype).
        return model_dtype if model_dtype in (torch.float16, torch.float32, torch.float64) else torch.float16

    @staticmethod
    def int_quantized(spec: GridSpec, activations: dict | None) -> bool:
        """Whether the layout is ``int-quantized`` (W8A8 per-channel symmetric) rather than ``pack-quantized``."""
        return bool(activations) and spec.bits == 8 and spec.sym and spec.group_size == -1 \
            and int(activations["bits"]) == 8

    def _scheme(self, spec: GridSpec, model_dtype: torch.dtype, act_order: bool,
                activations: dict | None = None) -> object:
        ct = _compressed_tensors()
        scale_dtype = self.scale_dtype(model_dtype)
        args = ct.Args(
            num_bits=spec.bits,
            type="int",
            symmetric=spec.sym,
            strategy="channel" if spec.group_size == -1 else "group",
            group_size=None if spec.group_size == -1 else spec.group_size,
            actorder="static" if act_order else None,
            scale_dtype=None if scale_dtype == model_dtype else scale_dtype,
        )
        inputs = None
        if activations:
            inputs = ct.Args(num_bits=int(activations["bits"]), type="int", symmetric=bool(activations["sym"]),
                             strategy="token" if activations["scheme"] == "per-token" else "tensor", dynamic=True)
        fmt = "int-quantized" if self.int_quantized(spec, activations) else "pack-quantized"
        return ct.Scheme(targets=["Linear"], weights=args, input_activations=inputs, format=fmt)

    def config(
        self, spec: GridSpec, *, model_dtype: torch.dtype, ignore: list[str], act_order: bool, desc_act: bool,
        version: str, activations: dict | None = None,
    ) -> dict:
        ct = _compressed_tensors()
        qconfig = ct.Config(
            config_groups={"group_0": self._scheme(spec, model_dtype, act_order and not desc_act, activations)},
            ignore=list(ignore),
            format="int-quantized" if self.int_quantized(spec, activations) else "pack-quantized",
            quantization_status="compressed",
        )
        # the keys and values ModelCompressor.update_config writes (model_compressor.py)
        body = qconfig.model_dump(exclude=["quant_method"])
        if desc_act:
            body["config_groups"]["group_0"]["weights"]["actorder"] = "group"
            warn(
                "group act-order (non-monotonic g_idx) is written as compressed-tensors actorder='group'; "
                "compressed-tensors >= 0.19 no longer loads it (vLLM and tritonq do); quantize with static "
                "act-order for files every tool reads"
            )
        return {"version": ct.version, "quant_method": ct.method, "sparsity_config": {}, "transform_config": {},
                **body}

    def write(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype,
              activations: dict | None = None) -> dict[str, Tensor]:
        ct = _compressed_tensors()
        n, k = q.shape
        mid = 2 ** (spec.bits - 1)
        if spec.sym and not bool((q.zero == mid).all()):
            raise TritonqError(f"{name}: a symmetric compressed-tensors grid needs every zero point at {mid}")
        scale = _stored_scale(name, q.scale, self.scale_dtype(model_dtype))
        zero = None if spec.sym else _signed(q.zero, spec.bits)
        if self.int_quantized(spec, activations):
            scheme = self._scheme(spec, model_dtype, act_order=False, activations=activations)
            out = ct.int_compressor.compress({"weight": q.dequantize(), "weight_scale": scale}, scheme)
            if out["weight"].dtype != torch.int8 or not torch.equal(out["weight"].to(torch.int16),
                                                                     _signed(q.codes, 8).to(torch.int16)):
                raise TritonqError(f"{name}: compressed-tensors {ct.version} quantized the grid points to other "
                                   "int8 codes than tritonq's; try compressed-tensors 0.20")
        elif _is_default_g_idx(q.g_idx, spec.effective_group(k)):
            state = {"weight": q.dequantize(), "weight_scale": scale}
            if zero is not None:
                state["weight_zero_point"] = zero
            out = ct.compressor.compress(state, self._scheme(spec, model_dtype, act_order=False))
            got = _unsigned(ct.unpack(out["weight_packed"], spec.bits, (n, k)), spec.bits)
            if not torch.equal(got, q.codes.to(torch.int16)):
                raise TritonqError(
                    f"{name}: compressed-tensors {ct.version} quantized the grid points to other codes than "
                    "tritonq's; this version's rounding differs from ours, so try compressed-tensors 0.20"
                )
        else:
            out = {
                "weight_packed": ct.pack(_signed(q.codes, spec.bits), spec.bits),
                "weight_scale": scale,
                "weight_shape": torch.tensor([n, k], dtype=torch.int64),
                "weight_g_idx": q.g_idx.to(torch.int32),
            }
            if zero is not None:
                out["weight_zero_point"] = ct.pack(zero, spec.bits, packed_dim=0)
        return {f"{name}.{leaf}": t.contiguous() for leaf, t in out.items()}

    def recognizes(self, qcfg: dict) -> bool:
        return _method(qcfg) == "compressed-tensors"

    def _weight_groups(self, qcfg: dict) -> list[tuple[list[str], object, bool]]:
        """``(targets, QuantizationArgs, group act-order)`` of every weight config group."""
        ct = _compressed_tensors()
        fmt = qcfg.get("format")
        groups = []
        for gname, group in (qcfg.get("config_groups") or {}).items():
            gfmt = group.get("format") or fmt
            w = group.get("weights")
            if w is None:
                continue
            if gfmt not in ("pack-quantized", "int-quantized"):
                raise TritonqError(
                    f"compressed-tensors format {gfmt!r} (group {gname}) is not supported; "
                    "tritonq reads pack-quantized and int-quantized int weights"
                )
            # input_activations (dynamic) are read by act_quant.saved_act_spec and applied at run time
            w = dict(w)
            # 'group' (alias 'dynamic') left the schema in compressed-tensors 0.19 but is still on the hub
            group_order = str(w.get("actorder")).lower() in ("group", "dynamic")
            if group_order:
                w.pop("actorder")
            try:
                args = ct.Args.model_validate(w)
            except ValueError as exc:  # pydantic's ValidationError is a ValueError
                raise TritonqError(
                    f"group {gname}: compressed-tensors {ct.version} cannot parse the weights config "
                    f"({str(exc).splitlines()[-1].strip()}); the checkpoint needs a newer compressed-tensors"
                ) from None
            if args.type != "int":
                raise TritonqError(f"group {gname}: weight type {args.type!r} is not supported (int only)")
            if args.strategy not in ("group", "channel"):
                raise TritonqError(
                    f"group {gname}: compressed-tensors strategy {args.strategy!r} is not supported "
                    "(group or channel)"
                )
            groups.append((list(group.get("targets") or ["Linear"]), args, group_order))
        if not groups:
            raise TritonqError("compressed-tensors config has no weight config_groups")
        return groups

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        ct = _compressed_tensors()
        groups = self._weight_groups(qcfg)
        ignore = list(qcfg.get("ignore") or [])
        for key in store.keys():
            if key.endswith(".weight") and f"{key}_scale" in store:  # int-quantized: int8 codes, per channel
                yield self._read_int8(store, key[: -len(".weight")], groups, ignore)
                continue
            if not key.endswith(".weight_packed"):
                continue
            name = key[: -len(".weight_packed")]
            if _matches(name, ignore, linear=False):
                raise TritonqError(
                    f"{name} has packed weights but is listed in 'ignore'; the checkpoint is inconsistent"
                )
            args = next((a for targets, a, _ in groups if _matches(name, targets, linear=True)), None)
            if args is None:
                raise TritonqError(f"{name} has packed weights but no config group targets it")
            bits = int(args.num_bits)
            if not 2 <= bits <= 8:
                raise TritonqError(f"{name}: {bits}-bit weights are not supported (2 to 8)")
            spec = GridSpec(bits, int(args.group_size) if args.strategy == "group" else -1, bool(args.symmetric))
            shape = store.get(f"{name}.weight_shape", "weight_shape").tolist()
            if len(shape) != 2:
                raise TritonqError(f"{name}: weight_shape {shape} is not 2-D")
            n, k = (int(s) for s in shape)
            packed = store.get(key)
            words = -(-k * bits // 32)
            if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
                raise TritonqError(
                    f"{name}: weight_packed must be int32 [{n}, {words}] for weight_shape [{n}, {k}] "
                    f"at {bits} bits, got {packed.dtype} {tuple(packed.shape)}"
                )
            codes = _unsigned(ct.unpack(packed, bits, (n, k)), bits)
            scale = store.get(f"{name}.weight_scale", "weight_scale").float()
            gs = spec.group_size
            groups_n = 1 if gs == -1 else k // gs if k % gs == 0 else -1
            if tuple(scale.shape) != (n, groups_n):
                raise TritonqError(f"{name}: weight_scale must be [{n}, {groups_n}], got {tuple(scale.shape)}")
            if spec.sym:
                zero = torch.full((n, groups_n), float(2 ** (bits - 1)))
            else:
                zp = store.get(f"{name}.weight_zero_point", "asymmetric zero point")
                if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n * bits // 32), groups_n):
                    zero = _unsigned(ct.unpack(zp, bits, (n, groups_n), packed_dim=0), bits).float()
                elif tuple(zp.shape) == (n, groups_n) and not zp.dtype.is_floating_point:
                    zero = _unsigned(zp, bits).float()  # unpacked int8 zero points of CT < 0.10
                else:
                    raise TritonqError(
                        f"{name}: weight_zero_point has unexpected shape {tuple(zp.shape)} / {zp.dtype}"
                    )
            g_idx = store.maybe(f"{name}.weight_g_idx")
            g_idx = _default_g_idx(k, spec.effective_group(k)) if g_idx is None else g_idx.to(torch.int32)
            q = QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx, store.maybe(f"{name}.bias"))
            _check_layer(name, q, spec)
            yield name, spec, q


    def _read_int8(self, store: TensorStore, name: str, groups: list, ignore: list[str]):
        if _matches(name, ignore, linear=False):
            raise TritonqError(f"{name} has int8 weights but is listed in 'ignore'; the checkpoint is inconsistent")
        args = next((a for targets, a, _ in groups if _matches(name, targets, linear=True)), None)
        if args is None:
            raise TritonqError(f"{name} has int8 weights but no config group targets it")
        if int(args.num_bits) != 8 or args.strategy != "channel" or not args.symmetric:
            raise TritonqError(f"{name}: int-quantized weights must be 8-bit symmetric per channel; got "
                               f"{args.num_bits}-bit {args.strategy} symmetric={args.symmetric}")
        weight = store.get(f"{name}.weight")
        n, k = weight.shape
        if weight.dtype != torch.int8:
            raise TritonqError(f"{name}: int-quantized weight must be int8, got {weight.dtype}")
        scale = store.get(f"{name}.weight_scale", "weight_scale").float().reshape(n, -1)
        if scale.shape[1] != 1:
            raise TritonqError(f"{name}: weight_scale must be [{n}, 1], got {tuple(scale.shape)}")
        spec = GridSpec(8, -1, True)
        q = QuantizedWeight(_unsigned(weight.to(torch.int16), 8).to(torch.uint8), scale, torch.full((n, 1), 128.0),
                            _default_g_idx(k, k), store.maybe(f"{name}.bias"))
        _check_layer(name, q, spec)
        return name, spec, q


class GptqFormat(PackedFormat):
    """GPTQ (v1: ``qzeros`` hold ``z - 1``), as AutoGPTQ, GPTQModel, transformers and vLLM read it (§1.1)."""

    name = "gptq"
    tensor_names = ("qweight", "qzeros", "scales", "g_idx")
    v2: ClassVar[bool] = False

    def check(self, spec: GridSpec) -> None:
        if spec.bits not in (2, 4, 8):
            raise TritonqError(f"tritonq writes GPTQ with 2, 4 or 8 bits, got {spec.bits}; use compressed-tensors")

    def config(
        self, spec: GridSpec, *, model_dtype: torch.dtype, ignore: list[str], act_order: bool, desc_act: bool,
        version: str,
    ) -> dict:
        cfg = {
            "quant_method": "gptq",
            "checkpoint_format": self.name,
            "bits": spec.bits,
            "group_size": spec.group_size,
            "desc_act": desc_act,
            "sym": spec.sym,
            "lm_head": False,
            "pack_dtype": "int32",
            "true_sequential": True,
            "static_groups": act_order and not desc_act,
            "meta": {"quantizer": [f"tritonq:{version}"]},
        }
        block_ignores = [m for m in ignore if m != "lm_head"]
        if block_ignores:  # GPTQModel's per-module override: "-:" skips a module (formats doc §1.1)
            cfg["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in block_ignores}
        return cfg

    def write(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
        zeros = q.zero.t().to(torch.int64)  # [G, N]
        if not self.v2:
            if int(zeros.min()) < 1:
                bad = int((zeros < 1).sum())
                raise TritonqError(
                    f"{name}: format gptq (v1) stores zero-1 and cannot hold the zero point 0 of {bad} groups "
                    "(asymmetric grid); use --format gptq_v2, compressed-tensors or awq instead"
                )
            zeros = zeros - 1
        return {
            f"{name}.qweight": _pack_k(q.codes.t(), spec.bits),
            f"{name}.qzeros": _pack_last(zeros, spec.bits),
            f"{name}.scales": _stored_scale(name, q.scale.t(), self.scale_dtype(model_dtype)),
            f"{name}.g_idx": q.g_idx.to(torch.int32),
        }

    def recognizes(self, qcfg: dict) -> bool:
        if _method(qcfg) != "gptq":
            return False
        variant = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
        if variant not in ("gptq", "gptq_v2"):
            raise TritonqError(
                f"GPTQ checkpoint_format {variant!r} is not supported; tritonq reads gptq and gptq_v2"
            )
        return variant == self.name

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        try:
            bits = int(qcfg["bits"])
            gs = int(qcfg["group_size"])
        except KeyError as exc:
            raise TritonqError(f"GPTQ quantization_config lacks {exc.args[0]!r}") from None
        if bits not in (2, 4, 8):
            raise TritonqError(f"GPTQ checkpoints with {bits} bits are not supported (2, 4 or 8)")
        spec = GridSpec(bits, gs, bool(qcfg.get("sym", True)))
        for name, qweight, scales, qzeros in _qweight_layers(store):
            if scales.dim() != 2 or qweight.dim() != 2 or qweight.dtype != torch.int32:
                raise TritonqError(f"{name}: qweight must be int32 [K*{bits}/32, N] and scales [G, N]")
            groups, n = scales.shape
            k = qweight.shape[0] * 32 // bits
            if qweight.shape[1] != n:
                raise TritonqError(f"{name}: qweight has {qweight.shape[1]} columns but scales {n}")
            g = spec.effective_group(k)
            if k % g or k // g != groups:
                raise TritonqError(
                    f"{name}: scales have {groups} groups, expected {k // g if k % g == 0 else '?'} "
                    f"for in_features {k} and group size {spec.group_size}"
                )
            if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (groups, -(-n * bits // 32)):
                raise TritonqError(
                    f"{name}: qzeros must be int32 [{groups}, {-(-n * bits // 32)}], "
                    f"got {qzeros.dtype} {tuple(qzeros.shape)}"
                )
            codes = _unpack_k(qweight, bits, k).t()
            zero = _unpack_last(qzeros, bits, n).t().float() + (0 if self.v2 else 1)
            g_idx = store.maybe(f"{name}.g_idx")
            g_idx = _default_g_idx(k, g) if g_idx is None else g_idx.to(torch.int32)
            q = QuantizedWeight(
                codes.to(torch.uint8),
                scales.float().t().contiguous(),
                zero.contiguous(),
                g_idx,
                store.maybe(f"{name}.bias"),
            )
            _check_layer(name, q, spec)
            yield name, spec, q

    def side_files(self, qcfg: dict) -> dict[str, dict]:
        # GPTQModel writes the same dict as quantize_config.json, the file vLLM's GPTQ configs look for
        return {"quantize_config.json": qcfg}


class GptqV2Format(GptqFormat):
    """GPTQModel's ``gptq_v2``: ``qzeros`` hold ``z`` itself, so asymmetric zero points 0 fit (§1.1)."""

    name = "gptq_v2"
    v2 = True


class AwqFormat(PackedFormat):
    """AutoAWQ GEMM: packed along N with the interleaved nibble order, no g_idx (formats doc §1.2)."""

    name = "awq"
    tensor_names = ("qweight", "qzeros", "scales")

    def check(self, spec: GridSpec) -> None:
        if spec.bits != 4 or spec.group_size == -1:
            raise TritonqError(
                f"AWQ GEMM stores 4-bit grouped weights only (got {spec.bits} bits, group size "
                f"{spec.group_size}); use --format compressed-tensors or gptq_v2"
            )

    def config(
        self, spec: GridSpec, *, model_dtype: torch.dtype, ignore: list[str], act_order: bool, desc_act: bool,
        version: str,
    ) -> dict:
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": ignore or None,
        }

    def write(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
        if not _is_default_g_idx(q.g_idx, spec.effective_group(q.shape[1])):
            raise TritonqError(
                f"{name}: AWQ has no g_idx and cannot store group act-order; use --format gptq_v2 or "
                "compressed-tensors, or quantize with static act-order"
            )
        return {
            f"{name}.qweight": awq_pack(q.codes.t().to(torch.int64)),
            f"{name}.qzeros": awq_pack(q.zero.t().to(torch.int64)),
            f"{name}.scales": _stored_scale(name, q.scale.t(), self.scale_dtype(model_dtype)),
        }

    def recognizes(self, qcfg: dict) -> bool:
        if _method(qcfg) != "awq":
            return False
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise TritonqError(f"AWQ version {version!r} is not supported; tritonq reads the GEMM layout")
        return True

    def read(self, store: TensorStore, qcfg: dict) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))  # vLLM accepts both spellings (formats doc §1.2)
        gs = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
        if bits != 4:
            raise TritonqError(f"AWQ GEMM checkpoints with {bits} bits are not supported (4 only)")
        spec = GridSpec(4, gs, False)
        for name, qweight, scales, qzeros in _qweight_layers(store):
            if qweight.dim() != 2 or scales.dim() != 2 or qweight.dtype != torch.int32:
                raise TritonqError(f"{name}: AWQ qweight must be int32 [K, N/8] and scales [G, N]")
            k, n = qweight.shape[0], scales.shape[1]
            if qweight.shape[1] * 8 != n:
                raise TritonqError(f"{name}: qweight has {qweight.shape[1]} words per row, scales {n} columns")
            g = spec.effective_group(k)
            if k % g or scales.shape[0] != k // g:
                raise TritonqError(
                    f"{name}: scales have {scales.shape[0]} groups; in_features {k}, group size {gs}"
                )
            if qzeros.dtype != torch.int32 or tuple(qzeros.shape) != (k // g, n // 8):
                raise TritonqError(
                    f"{name}: qzeros must be int32 [{k // g}, {n // 8}], got {tuple(qzeros.shape)}"
                )
            q = QuantizedWeight(
                awq_unpack(qweight, n).t().to(torch.uint8).contiguous(),
                scales.float().t().contiguous(),
                awq_unpack(qzeros, n).t().float().contiguous(),
                _default_g_idx(k, g),
                store.maybe(f"{name}.bias"),
            )
            _check_layer(name, q, spec)
            yield name, spec, q


FORMATS: dict[str, PackedFormat] = {
    fmt.name: fmt for fmt in (CompressedTensorsFormat(), GptqFormat(), GptqV2Format(), AwqFormat())
}


GGUF_FORMAT = "gguf"  # a single-file export (engine/gguf_export.py), written by save_packed, not read back
OUTPUT_FORMATS = (*FORMATS, GGUF_FORMAT)  # every --format of 'tritonq pack' (and, with fake, of quantize)


def get_format(name: str) -> PackedFormat:
    """The format registered under ``name``; a clear error listing the choices otherwise."""
    if name not in FORMATS:
        raise TritonqError(f"unknown format {name!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    return FORMATS[name]


# ---------------------------------------------------------------------------------------------------
# source: a tritonq output directory (fake-quantized float weights + quant_params.safetensors)


def read_source(src_dir: str | os.PathLike) -> tuple[dict, GridSpec, dict]:
    """Read a ``tritonq quantize`` output: (config.json dict, grid, quantization.json dict)."""
    src = Path(src_dir)
    cfg_file = src / "config.json"
    if cfg_file.is_file() and "quantization_config" in json.loads(cfg_file.read_text()):
        raise TritonqError(
            f"{src} is already a packed checkpoint; pack reads the fake-quantized output of 'tritonq quantize'"
        )
    for f in ("config.json", QUANT_JSON, QUANT_PARAMS):
        if not (src / f).is_file():
            raise TritonqError(
                f"{src} has no {f}; pass a directory written by 'tritonq quantize' (--format fake)"
            )
    meta = json.loads((src / QUANT_JSON).read_text())
    for key in ("bits", "group_size", "sym", "layers"):
        if key not in meta:
            raise TritonqError(f"{src / QUANT_JSON} lacks {key!r}; re-run 'tritonq quantize'")
    spec = GridSpec(int(meta["bits"]), int(meta["group_size"]), bool(meta["sym"]))
    config = json.loads((src / "config.json").read_text())
    return config, spec, meta


def source_layers(
    src_dir: str | os.PathLike, spec: GridSpec, layers: list[str]
) -> Iterator[tuple[str, QuantizedWeight]]:
    """The integer record of every quantized linear of a tritonq output, rebuilt bit exactly from its grid."""
    src = Path(src_dir)
    weights = TensorStore(src)
    params = TensorStore(src, QUANT_PARAMS)
    for name in layers:
        w = weights.get(f"{name}.weight", "quantized linear weight")
        g_idx = params.maybe(f"{name}.g_idx")
        if g_idx is None:
            g_idx = _default_g_idx(w.shape[-1], spec.effective_group(w.shape[-1]))
        yield name, QuantizedWeight.from_grid(
            name,
            w,
            params.get(f"{name}.scale", "scale"),
            params.get(f"{name}.zero", "zero point"),
            g_idx,
            spec,
            weights.maybe(f"{name}.bias"),
        )


# ---------------------------------------------------------------------------------------------------
# writing


def _model_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _linear_names(config: dict) -> list[str]:
    """All nn.Linear module names of the architecture (built on the meta device, nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _warn_marlin(quantized: Mapping[str, QuantizedWeight]) -> None:
    """vLLM's Marlin kernels need K % 128 == 0 and N % 64 == 0 (formats doc §1.4): say so early."""
    bad = [n for n, q in quantized.items() if q.shape[1] % 128 or q.shape[0] % 64]
    if bad:
        warn(
            f"{len(bad)} layers (e.g. {bad[0]}) have in_features % 128 != 0 or out_features % 64 != 0; "
            "vLLM falls back from Marlin to a slower kernel for them"
        )


def write_packed_record(out_dir: Path, meta: dict, fmt: str) -> None:
    """Keep the source's ``quantization.json`` beside a packed checkpoint, marked with its format, so that
    ``tritonq report`` shows the method and stage times of packed outputs too and ``eval --record`` can
    store their scores. Loaders read ``config.json``; nothing decides fake-or-packed from this file (the
    ``quantization_config`` does). The fake model's scores are dropped: they were not taken on these files."""
    record = {k: v for k, v in meta.items() if k != "evaluations"}
    (out_dir / QUANT_JSON).write_text(json.dumps({**record, "format": fmt}, indent=2) + "\n")


def save_packed(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str = DEFAULT_FORMAT,
    overwrite: bool = False,
    layers: Mapping[str, QuantizedWeight] | None = None,
) -> Path:
    """Pack a tritonq output directory into ``fmt`` and write a loadable checkpoint at ``out_dir``.

    The integer records come from ``layers`` when the caller still holds them (right after quantization),
    else they are rebuilt from ``quant_params.safetensors`` and checked bit exact against the float
    weights (:meth:`QuantizedWeight.from_grid`). Non-quantized tensors (embeddings, norms, lm_head, biases)
    are copied unchanged; tokenizer and generation files are copied; ``config.json`` gains the format's
    ``quantization_config`` (plus the format's side files, e.g. GPTQ's ``quantize_config.json``). The output
    appears atomically. Returns the output path. ``fmt="gguf"`` writes ``out_dir/model.gguf`` instead
    (:func:`tritonq.engine.formats.packed.gguf.save_gguf`).
    """
    from ... import __version__

    if fmt == GGUF_FORMAT:  # one file of ggml blocks, not a safetensors checkpoint
        from .gguf import save_gguf

        return save_gguf(src_dir, out_dir, overwrite=overwrite, layers=layers)
    packer = get_format(fmt)
    config, spec, meta = read_source(src_dir)
    packer.check(spec)
    names = list(meta["layers"])
    src = Path(src_dir)
    if layers is None:
        quantized = dict(source_layers(src, spec, names))
    else:
        if set(layers) != set(names):
            extra = sorted(set(layers) ^ set(names))
            raise TritonqError(
                f"the records passed to save_packed and {src / QUANT_JSON} name different layers (e.g. "
                f"{extra[0]}); pass the records of the run that wrote {src}"
            )
        for name in names:
            _check_layer(name, layers[name], spec)
        quantized = {name: layers[name] for name in names}
    model_dtype = _model_dtype(config)
    desc_act = any(not _is_default_g_idx(q.g_idx, spec.effective_group(q.shape[1])) for q in quantized.values())
    tensors: dict[str, Tensor] = {}
    weights = TensorStore(src)
    for key in weights.keys():
        if key.removesuffix(".weight") not in quantized:
            tensors[key] = weights.get(key)
    activations = meta.get("activations")
    act_kw = {"activations": activations} if activations and isinstance(packer, CompressedTensorsFormat) else {}
    if activations and not act_kw:
        warn(f"the {fmt} config cannot say how activations are quantized; tritonq keeps its record "
             "(tritonq_activations in config.json), other loaders will run the model weight-only")
    for name, q in quantized.items():
        tensors.update(packer.write(name, q, spec, model_dtype, **act_kw))
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias
    qcfg = packer.config(
        spec,
        model_dtype=model_dtype,
        ignore=[n for n in _linear_names(config) if n not in quantized],
        act_order=bool(meta.get("act_order")),
        desc_act=desc_act,
        version=__version__,
        **act_kw,
    )
    _warn_marlin(quantized)
    config = {**config, "quantization_config": qcfg}
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in _SKIP_COPY and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, content in packer.side_files(qcfg).items():
            (tmp / fname).write_text(json.dumps(content, indent=2) + "\n")
        write_packed_record(tmp, meta, fmt)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------
# reading


def _quant_config(directory: Path) -> dict:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise TritonqError(f"{directory} has no config.json; pass a packed checkpoint directory")
    config = json.loads(cfg_file.read_text())
    qcfg = config.get("quantization_config") or config.get("compression_config")
    if not qcfg:
        if (directory / QUANT_JSON).is_file():
            raise TritonqError(
                f"{directory} is a fake-quantized tritonq output, not a packed checkpoint; "
                f"run 'tritonq pack {directory} --output DIR' first"
            )
        raise TritonqError(
            f"{directory}/config.json has no quantization_config; it is not a packed checkpoint"
        )
    return qcfg


def checkpoint_format(directory: str | os.PathLike) -> str:
    """The :data:`FORMATS` name of a packed checkpoint, from its ``config.json``; an error otherwise."""
    qcfg = _quant_config(Path(directory))
    for fmt in FORMATS.values():
        if fmt.recognizes(qcfg):
            return fmt.name
    raise TritonqError(f"quant_method {_method(qcfg)!r} is not supported; tritonq reads {', '.join(FORMATS)}")


def read_packed(directory: str | os.PathLike) -> Iterator[tuple[str, GridSpec, QuantizedWeight]]:
    """Every quantized linear of a packed checkpoint as (name, grid, integer record), in file order."""
    d = Path(directory)
    fmt = FORMATS[checkpoint_format(d)]
    yield from fmt.read(TensorStore(d), _quant_config(d))


def float_tensors(directory: str | os.PathLike, quantized: set[str]) -> Iterator[tuple[str, Tensor]]:
    """The non-quantized tensors of a packed checkpoint (embeddings, norms, lm_head, biases)."""
    d = Path(directory)
    packed_leaves = FORMATS[checkpoint_format(d)].tensor_names
    store = TensorStore(d)
    for key in store.keys():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in packed_leaves:
            continue
        if module in quantized and leaf == "bias":
            continue  # carried by the PackedLinear
        yield key, store.get(key)


def to_runtime(q: QuantizedWeight, spec: GridSpec) -> PackedLinear | PackedInt8Linear:
    """Convert an integer record into the runtime layout of its kernel (int4 dequant-matmul, or W8A8 int8)."""
    from ...kernels.pack import pack_int4

    if spec.bits == 8 and spec.sym and spec.group_size == -1:
        n, k = q.shape
        return PackedInt8Linear(_signed(q.codes, 8).to(torch.int8), q.scale.reshape(n).float(), k, n, q.bias)
    if spec.bits != 4:
        raise TritonqError(
            f"the int4 dequant-matmul kernel serves 4-bit weights only; this checkpoint has {spec.bits} bits"
        )
    n, k = q.shape
    if k % 8:
        raise TritonqError(f"in_features {k} is not a multiple of 8; the int4 layout packs 8 rows per word")
    g = spec.effective_group(k)
    sym = bool((q.zero == 8).all())
    return PackedLinear(
        qweight=pack_int4(q.codes.t().contiguous()),
        scales=q.scale.t().contiguous(),
        zeros=None if sym else q.zero.t().contiguous(),
        g_idx=None if _is_default_g_idx(q.g_idx, g) else q.g_idx.to(torch.int32),
        group_size=g,
        in_features=k,
        out_features=n,
        bias=q.bias,
    )


def load_packed_layers(directory: str | os.PathLike) -> dict[str, PackedLinear | PackedInt8Linear]:
    """Every quantized linear of a packed checkpoint (any supported format) in the runtime layout."""
    return {name: to_runtime(q, spec) for name, spec, q in read_packed(directory)}
