"""The one reader and writer of every packed checkpoint layout tritonq knows.

A tritonq output directory (``tritonq quantize --format fake``) holds float weights that lie exactly
on the grid plus ``quant_params.safetensors`` (scale, zero, g_idx per quantized linear). This module
turns such a directory into the integer layouts the ecosystem loads, and reads those layouts back,
including checkpoints written by llm-compressor, GPTQModel/AutoGPTQ and AutoAWQ:

* ``compressed-tensors`` ``pack-quantized`` (default; llm-compressor's output, vLLM's native format):
  ``weight_packed`` int32 [N, K*b/32] packed along K, ``weight_scale`` [N, G], ``weight_shape``,
  ``weight_zero_point`` int32 [N*b/32, G] packed along N (asymmetric only; signed ``z - 2^(b-1)``),
  ``weight_g_idx`` [K] for group act-order only.
  Source read: vllm-project/compressed-tensors ``compressors/pack_quantized/{base,helpers}.py`` and
  ``quantization/quant_args.py``.
* ``gptq`` / ``gptq_v2``: ``qweight`` int32 [K*b/32, N] packed along K, ``qzeros`` int32 [G, N*b/32]
  packed along N (v1 stores ``z - 1``, v2 stores ``z``), ``scales`` fp16 [G, N], ``g_idx`` int32 [K].
  Sources: ModelCloud/GPTQModel ``nn_modules/qlinear/__init__.py`` (``pack_block``), AutoGPTQ
  ``qlinear_cuda_old.py`` (``zeros -= 1``).
* ``awq`` (AutoAWQ GEMM): ``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along N with
  the interleaved nibble order ``[0, 2, 4, 6, 1, 3, 5, 7]``, ``scales`` fp16 [G, N], no g_idx.
  Source: casper-hansen/AutoAWQ ``awq/modules/linear/gemm.py``, ``awq/utils/packing_utils.py``.

Bit layouts are summarised in ``../shared/docs/formats_and_ecosystem.md`` §1. Every layout is written
and read through one format-neutral record, :class:`QuantizedWeight` (unsigned codes, fp32 scale and
zero per group, g_idx), so a round trip through any writer and reader is bit exact. The serving path
uses :class:`PackedLinear`, the runtime layout of ``kernels/dequant_matmul.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import TritonqError
from .grid import codes_of, dequantize
from .outputs import atomic_output_dir

FORMATS = ("compressed-tensors", "gptq", "gptq_v2", "awq")
DEFAULT_FORMAT = "compressed-tensors"
QUANT_JSON = "quantization.json"
QUANT_PARAMS = "quant_params.safetensors"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
CT_FORMAT_VERSION = "0.20.0"  # the compressed-tensors release whose layout we write and test against
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_SKIP_COPY = {QUANT_JSON, QUANT_PARAMS, "config.json", *_WEIGHT_FILES}


# ---------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class QuantSpec:
    """What every quantized linear of a checkpoint shares."""

    bits: int
    group_size: int  # -1 = one group per output channel
    sym: bool
    act_order: bool = False


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
        from ..kernels.pack import pack_int4

        return pack_int4(codes_kn)
    return _pack_last(codes_kn.t(), bits).t().contiguous()


def _unpack_k(qweight: Tensor, bits: int, k: int) -> Tensor:
    if bits == 4 and qweight.shape[0] * 8 == k:
        from ..kernels.pack import unpack_int4

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


def _check_layer(name: str, q: QuantizedWeight, spec: QuantSpec) -> None:
    """Shapes and ranges of one record; a clear error naming the layer and the broken rule."""
    if q.codes.dim() != 2:
        raise TritonqError(f"{name}: codes must be 2-D [N, K], got shape {tuple(q.codes.shape)}")
    n, k = q.codes.shape
    g = k if spec.group_size == -1 else spec.group_size
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
    maxq = 2**spec.bits - 1
    if q.codes.numel() and int(q.codes.max()) > maxq:
        raise TritonqError(f"{name}: codes exceed {maxq}, the largest {spec.bits}-bit code")
    if q.zero.numel() and (float(q.zero.min()) < 0 or float(q.zero.max()) > maxq):
        raise TritonqError(f"{name}: zero points must lie in 0..{maxq}")
    if not torch.isfinite(q.scale).all() or (q.scale <= 0).any():
        raise TritonqError(f"{name}: scales must be finite and positive")


def _default_g_idx(k: int, g: int) -> Tensor:
    return torch.arange(k, dtype=torch.int32) // g


def _is_default_g_idx(g_idx: Tensor, g: int) -> bool:
    return bool(torch.equal(g_idx.to(torch.int32), _default_g_idx(g_idx.numel(), g)))


def _fp16_exact(t: Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


# ---------------------------------------------------------------------------------------------------
# source: a tritonq output directory (fake-quantized float weights + quant_params.safetensors)


def read_source(src_dir: str | os.PathLike) -> tuple[dict, QuantSpec, dict]:
    """Read a ``tritonq quantize`` output: (config.json dict, spec, quantization.json dict)."""
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
    spec = QuantSpec(
        int(meta["bits"]), int(meta["group_size"]), bool(meta["sym"]), bool(meta.get("act_order"))
    )
    config = json.loads((src / "config.json").read_text())
    return config, spec, meta


def source_layers(
    src_dir: str | os.PathLike, spec: QuantSpec, layers: list[str]
) -> Iterator[tuple[str, QuantizedWeight]]:
    """Recover the integer codes of every quantized linear of a tritonq output, checking the grid."""
    src = Path(src_dir)
    weights = TensorStore(src)
    params = TensorStore(src, QUANT_PARAMS)
    maxq = 2**spec.bits - 1
    for name in layers:
        w = weights.get(f"{name}.weight", "quantized linear weight").float()
        scale = params.get(f"{name}.scale", "scale").float()
        zero = params.get(f"{name}.zero", "zero point").float()
        n, k = w.shape
        g_idx = params.maybe(f"{name}.g_idx")
        if g_idx is None:
            g = k if spec.group_size == -1 else spec.group_size
            g_idx = _default_g_idx(k, g)
        q = QuantizedWeight(
            torch.zeros(n, k, dtype=torch.uint8),
            scale,
            zero,
            g_idx.to(torch.int32),
            weights.maybe(f"{name}.bias"),
        )
        _check_layer(name, q, spec)
        q.codes = codes_of(w, scale, zero, q.g_idx, maxq)
        err = (q.dequantize() - w).abs()
        tol = 1e-2 * scale[:, q.g_idx.long()] + w.abs() * 2**-7  # exact in fp32; bf16 rounding allowed
        if (err > tol).any():
            raise TritonqError(
                f"{name}: the float weights do not lie on the grid of {QUANT_PARAMS} (max error "
                f"{float(err.max()):.3g}); the directory was modified or not written by 'tritonq quantize'"
            )
        yield name, q


# ---------------------------------------------------------------------------------------------------
# writers: one function per layout, each returning the tensors of one linear


def _ct_tensors(
    name: str, q: QuantizedWeight, spec: QuantSpec, scale_dtype: torch.dtype
) -> dict[str, Tensor]:
    n, k = q.shape
    out = {
        f"{name}.weight_packed": _pack_k(q.codes.t(), spec.bits).t().contiguous(),
        f"{name}.weight_scale": q.scale.to(scale_dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not spec.sym:  # stored unsigned (signed z - 2^(b-1), offset back by the packer), along N
        out[f"{name}.weight_zero_point"] = _pack_last(q.zero.t().to(torch.int64), spec.bits).t().contiguous()
    g = k if spec.group_size == -1 else spec.group_size
    if not _is_default_g_idx(q.g_idx, g):
        out[f"{name}.weight_g_idx"] = q.g_idx.to(torch.int32)
    return out


def _gptq_tensors(name: str, q: QuantizedWeight, spec: QuantSpec, v2: bool) -> dict[str, Tensor]:
    zeros = q.zero.t().to(torch.int64)  # [G, N]
    if not v2:
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
        f"{name}.scales": q.scale.t().to(torch.float16).contiguous(),
        f"{name}.g_idx": q.g_idx.to(torch.int32),
    }


def _awq_tensors(name: str, q: QuantizedWeight, spec: QuantSpec) -> dict[str, Tensor]:
    n, k = q.shape
    g = k if spec.group_size == -1 else spec.group_size
    if not _is_default_g_idx(q.g_idx, g):
        raise TritonqError(
            f"{name}: AWQ has no g_idx and cannot store group act-order; use --format gptq_v2 or "
            "compressed-tensors, or quantize with static act-order"
        )
    return {
        f"{name}.qweight": awq_pack(q.codes.t().to(torch.int64)),
        f"{name}.qzeros": awq_pack(q.zero.t().to(torch.int64)),
        f"{name}.scales": q.scale.t().to(torch.float16).contiguous(),
    }


def _check_format(fmt: str, spec: QuantSpec) -> None:
    if fmt not in FORMATS:
        raise TritonqError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "awq" and (spec.bits != 4 or spec.group_size == -1):
        raise TritonqError(
            f"AWQ GEMM stores 4-bit grouped weights only (got {spec.bits} bits, group size "
            f"{spec.group_size}); use --format compressed-tensors or gptq_v2"
        )
    if fmt in ("gptq", "gptq_v2") and spec.bits not in (2, 4, 8):
        raise TritonqError(
            f"tritonq writes GPTQ with 2, 4 or 8 bits, got {spec.bits}; use compressed-tensors"
        )
    if fmt == "compressed-tensors" and not 1 <= spec.bits <= 8:
        raise TritonqError(f"compressed-tensors pack-quantized holds 1 to 8 bits, got {spec.bits}")


def _dtype_name(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _config_for(
    fmt: str, spec: QuantSpec, ignore: list[str], desc_act: bool, scale_dtype: str | None, version: str
) -> dict:
    """The ``quantization_config`` block of ``config.json`` for each format."""
    g = spec.group_size
    if fmt == "compressed-tensors":
        weights = {
            "num_bits": spec.bits,
            "type": "int",
            "symmetric": spec.sym,
            "strategy": "channel" if g == -1 else "group",
            "group_size": None if g == -1 else g,
            "dynamic": False,
            "observer": "minmax",
        }
        actorder = "group" if desc_act else ("static" if spec.act_order else None)
        if actorder is not None:  # CT omits None-valued fields when it serialises QuantizationArgs
            weights["actorder"] = actorder
        if scale_dtype is not None:
            weights["scale_dtype"] = scale_dtype
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "version": CT_FORMAT_VERSION,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                    "format": "pack-quantized",
                }
            },
            "ignore": ignore,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
        }
    if fmt in ("gptq", "gptq_v2"):
        cfg = {
            "quant_method": "gptq",
            "checkpoint_format": fmt,
            "bits": spec.bits,
            "group_size": g,
            "desc_act": desc_act,
            "sym": spec.sym,
            "lm_head": False,
            "pack_dtype": "int32",
            "true_sequential": True,
            "static_groups": spec.act_order and not desc_act,
            "meta": {"quantizer": [f"tritonq:{version}"]},
        }
        block_ignores = [m for m in ignore if m != "lm_head"]
        if block_ignores:
            cfg["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in block_ignores}
        return cfg
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": g,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": ignore or None,
    }


def _linear_names(config: dict) -> list[str]:
    """All nn.Linear module names of the architecture (built on the meta device, nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def save_packed(
    src_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = DEFAULT_FORMAT, overwrite: bool = False
) -> Path:
    """Pack a tritonq output directory into ``fmt`` and write a loadable checkpoint at ``out_dir``.

    Non-quantized tensors (embeddings, norms, lm_head, biases) are copied unchanged; tokenizer and
    generation files are copied; ``config.json`` gains the format's ``quantization_config``
    (``quantize_config.json`` too for GPTQ, as GPTQModel writes it). Returns the output path.
    """
    from .. import __version__

    config, spec, meta = read_source(src_dir)
    _check_format(fmt, spec)
    layers = list(meta["layers"])
    src = Path(src_dir)
    model_dtype = _dtype_name(config)
    tensors: dict[str, Tensor] = {}
    desc_act = False
    quantized = list(source_layers(src, spec, layers))
    for _name, q in quantized:
        g = q.shape[1] if spec.group_size == -1 else spec.group_size
        desc_act = desc_act or not _is_default_g_idx(q.g_idx, g)
    if fmt == "compressed-tensors":
        # CT stores scales in the model dtype; bf16 cannot hold every fp16 scale, so keep fp16 then.
        torch_dtype = getattr(torch, model_dtype, torch.float32)
        exact = all(torch.equal(q.scale.to(torch_dtype).float(), q.scale) for _, q in quantized)
        scale_dtype = torch_dtype if exact else torch.float16
        scale_dtype_name = None if exact else "torch.float16"
        if desc_act:
            print(
                "tritonq: note: group act-order (non-monotonic g_idx) is written as CT actorder='group'; "
                "compressed-tensors >= 0.20 no longer loads it (vLLM and tritonq do)",
                file=sys.stderr,
            )
    for name, q in quantized:
        if fmt == "compressed-tensors":
            tensors.update(_ct_tensors(name, q, spec, scale_dtype))
        elif fmt in ("gptq", "gptq_v2"):
            tensors.update(_gptq_tensors(name, q, spec, v2=fmt == "gptq_v2"))
        else:
            tensors.update(_awq_tensors(name, q, spec))
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias
    weights = TensorStore(src)
    quantized_keys = {f"{n}.weight" for n in layers} | {f"{n}.bias" for n in layers}
    for key in weights.keys():
        if key not in quantized_keys:
            tensors[key] = weights.get(key)
    ignore = [n for n in _linear_names(config) if n not in set(layers)]
    qcfg = _config_for(
        fmt, spec, ignore, desc_act, scale_dtype_name if fmt == "compressed-tensors" else None, __version__
    )
    _warn_marlin(quantized, spec)
    config = dict(config)
    config["quantization_config"] = qcfg
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
        if fmt in ("gptq", "gptq_v2"):
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return Path(out_dir)


def _warn_marlin(quantized: list[tuple[str, QuantizedWeight]], spec: QuantSpec) -> None:
    """vLLM's Marlin kernels need K % 128 == 0 and N % 64 == 0 (formats doc §1.4): say so early."""
    bad = [n for n, q in quantized if q.shape[1] % 128 or q.shape[0] % 64]
    if bad:
        print(
            f"tritonq: note: {len(bad)} layers (e.g. {bad[0]}) have in_features % 128 != 0 or "
            "out_features % 64 != 0; vLLM falls back from Marlin to a slower kernel for them",
            file=sys.stderr,
        )


def pack_command(args) -> int:
    """``tritonq pack SRC --format F --output OUT [--overwrite]``."""
    fmt = args.out_format
    out = save_packed(args.src, args.output, fmt, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {fmt} checkpoint to {out} ({size / 2**20:.1f} MiB)")
    return 0


# ---------------------------------------------------------------------------------------------------
# readers


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
    """``compressed-tensors``, ``gptq``, ``gptq_v2`` or ``awq`` from ``config.json``; error otherwise."""
    qcfg = _quant_config(Path(directory))
    method = str(qcfg.get("quant_method", "compressed-tensors" if "config_groups" in qcfg else "")).lower()
    if method == "compressed-tensors":
        return method
    if method == "gptq":
        fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise TritonqError(
                f"GPTQ checkpoint_format {fmt!r} is not supported; tritonq reads gptq and gptq_v2"
            )
        return fmt
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise TritonqError(f"AWQ version {version!r} is not supported; tritonq reads the GEMM layout")
        return "awq"
    raise TritonqError(f"quant_method {method!r} is not supported; tritonq reads {', '.join(FORMATS)}")


def _ct_schemes(qcfg: dict) -> tuple[list[tuple[list[str], dict]], list[str]]:
    fmt = qcfg.get("format")
    groups = []
    for gname, group in (qcfg.get("config_groups") or {}).items():
        gfmt = group.get("format") or fmt
        w = group.get("weights")
        if w is None:
            continue
        if gfmt != "pack-quantized":
            raise TritonqError(
                f"compressed-tensors format {gfmt!r} (group {gname}) is not supported; "
                "tritonq reads pack-quantized int weights"
            )
        if group.get("input_activations"):
            raise TritonqError(
                f"group {gname} quantizes activations; tritonq serves weight-only (W*A16) schemes"
            )
        if w.get("type", "int") != "int":
            raise TritonqError(f"group {gname}: weight type {w.get('type')!r} is not supported (int only)")
        groups.append((list(group.get("targets") or ["Linear"]), w))
    if not groups:
        raise TritonqError("compressed-tensors config has no weight config_groups")
    return groups, list(qcfg.get("ignore") or [])


def _ct_match(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t == "Linear" or t == name or (t.startswith("re:") and re.match(t[3:], name)):
            return True
    return False


def _read_ct(store: TensorStore, qcfg: dict) -> Iterator[tuple[str, QuantSpec, QuantizedWeight]]:
    schemes, ignore = _ct_schemes(qcfg)
    for key in store.keys():
        if not key.endswith(".weight_packed"):
            continue
        name = key[: -len(".weight_packed")]
        if any(t == name or (t.startswith("re:") and re.match(t[3:], name)) for t in ignore):
            raise TritonqError(
                f"{name} has packed weights but is listed in 'ignore'; the checkpoint is inconsistent"
            )
        w = next((w for targets, w in schemes if _ct_match(name, targets)), None)
        if w is None:
            raise TritonqError(f"{name} has packed weights but no config group targets it")
        bits = int(w.get("num_bits", 8))
        strategy = str(
            w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel")
        ).lower()
        if strategy not in ("group", "channel"):
            raise TritonqError(
                f"{name}: compressed-tensors strategy {strategy!r} is not supported (group or channel)"
            )
        shape = store.get(f"{name}.weight_shape", "weight_shape").tolist()
        if len(shape) != 2:
            raise TritonqError(f"{name}: weight_shape {shape} is not 2-D")
        n, k = (int(s) for s in shape)
        gs = int(w["group_size"]) if strategy == "group" else -1
        sym = bool(w.get("symmetric", True))
        spec = QuantSpec(bits, gs, sym, w.get("actorder") is not None)
        if not 1 <= bits <= 8:
            raise TritonqError(f"{name}: {bits}-bit weights are not supported")
        packed = store.get(key)
        words = -(-k * bits // 32)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words):
            raise TritonqError(
                f"{name}: weight_packed must be int32 [{n}, {words}] for weight_shape [{n}, {k}] "
                f"at {bits} bits, got {packed.dtype} {tuple(packed.shape)}"
            )
        codes = _unpack_k(packed.t().contiguous(), bits, k).t()
        scale = store.get(f"{name}.weight_scale", "weight_scale").float()
        groups = 1 if gs == -1 else k // gs if k % gs == 0 else -1
        if tuple(scale.shape) != (n, groups):
            raise TritonqError(f"{name}: weight_scale must be [{n}, {groups}], got {tuple(scale.shape)}")
        mid = 2 ** (bits - 1)
        if sym:
            zero = torch.full((n, groups), float(mid))
        else:
            zp = store.get(f"{name}.weight_zero_point", "asymmetric zero point")
            if zp.dtype == torch.int32 and tuple(zp.shape) == (-(-n * bits // 32), groups):
                zero = _unpack_last(zp.t().contiguous(), bits, n).t().float()  # stored z + 2^(b-1)
            elif tuple(zp.shape) == (n, groups) and not zp.dtype.is_floating_point:
                zero = zp.float() + mid  # unpacked int8 zero points of CT < 0.10
            else:
                raise TritonqError(
                    f"{name}: weight_zero_point has unexpected shape {tuple(zp.shape)} / {zp.dtype}"
                )
        g_idx = store.maybe(f"{name}.weight_g_idx")
        g = k if gs == -1 else gs
        g_idx = _default_g_idx(k, g) if g_idx is None else g_idx.to(torch.int32)
        q = QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx, store.maybe(f"{name}.bias"))
        _check_layer(name, q, spec)
        yield name, spec, q


def _gptq_spec(qcfg: dict) -> QuantSpec:
    try:
        bits = int(qcfg["bits"])
        gs = int(qcfg["group_size"])
    except KeyError as exc:
        raise TritonqError(f"GPTQ quantization_config lacks {exc.args[0]!r}") from None
    return QuantSpec(bits, gs, bool(qcfg.get("sym", True)), bool(qcfg.get("desc_act", False)))


def _read_gptq(store: TensorStore, qcfg: dict, v2: bool) -> Iterator[tuple[str, QuantSpec, QuantizedWeight]]:
    spec = _gptq_spec(qcfg)
    bits = spec.bits
    if bits not in (2, 4, 8):
        raise TritonqError(f"GPTQ checkpoints with {bits} bits are not supported (2, 4 or 8)")
    for key in store.keys():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight = store.get(key)
        scales = store.get(f"{name}.scales", "scales")
        qzeros = store.get(f"{name}.qzeros", "qzeros")
        if scales.dim() != 2 or qweight.dim() != 2 or qweight.dtype != torch.int32:
            raise TritonqError(f"{name}: qweight must be int32 [K*{bits}/32, N] and scales [G, N]")
        groups, n = scales.shape
        k = qweight.shape[0] * 32 // bits
        if qweight.shape[1] != n:
            raise TritonqError(f"{name}: qweight has {qweight.shape[1]} columns but scales {n}")
        g = k if spec.group_size == -1 else spec.group_size
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
        zero = _unpack_last(qzeros, bits, n).t().float() + (0 if v2 else 1)
        g_idx = store.maybe(f"{name}.g_idx")
        g_idx = _default_g_idx(k, g) if g_idx is None else g_idx.to(torch.int32)
        q = QuantizedWeight(
            codes.to(torch.uint8),
            scales.float().t().contiguous(),
            zero.contiguous(),
            g_idx,
            store.maybe(f"{name}.bias"),
        )
        _check_layer(name, q, QuantSpec(bits, spec.group_size, spec.sym))
        yield name, spec, q


def _read_awq(store: TensorStore, qcfg: dict) -> Iterator[tuple[str, QuantSpec, QuantizedWeight]]:
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    gs = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    if bits != 4:
        raise TritonqError(f"AWQ GEMM checkpoints with {bits} bits are not supported (4 only)")
    spec = QuantSpec(4, gs, False)
    for key in store.keys():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        qweight = store.get(key)
        scales = store.get(f"{name}.scales", "scales")
        qzeros = store.get(f"{name}.qzeros", "qzeros")
        if qweight.dim() != 2 or scales.dim() != 2 or qweight.dtype != torch.int32:
            raise TritonqError(f"{name}: AWQ qweight must be int32 [K, N/8] and scales [G, N]")
        k, n = qweight.shape[0], scales.shape[1]
        if qweight.shape[1] * 8 != n:
            raise TritonqError(f"{name}: qweight has {qweight.shape[1]} words per row, scales {n} columns")
        g = k if gs == -1 else gs
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


def read_packed(directory: str | os.PathLike) -> Iterator[tuple[str, QuantSpec, QuantizedWeight]]:
    """Every quantized linear of a packed checkpoint as (name, spec, integer record), in file order."""
    d = Path(directory)
    fmt = checkpoint_format(d)
    qcfg = _quant_config(d)
    store = TensorStore(d)
    if fmt == "compressed-tensors":
        yield from _read_ct(store, qcfg)
    elif fmt in ("gptq", "gptq_v2"):
        yield from _read_gptq(store, qcfg, v2=fmt == "gptq_v2")
    else:
        yield from _read_awq(store, qcfg)


_PACKED_SUFFIXES = {
    "compressed-tensors": (
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
        "weight_g_idx",
    ),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "gptq_v2": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
}


def float_tensors(directory: str | os.PathLike, quantized: set[str]) -> Iterator[tuple[str, Tensor]]:
    """The non-quantized tensors of a packed checkpoint (embeddings, norms, lm_head, biases)."""
    d = Path(directory)
    suffixes = _PACKED_SUFFIXES[checkpoint_format(d)]
    store = TensorStore(d)
    for key in store.keys():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf in suffixes:
            continue
        if module in quantized and leaf == "bias":
            continue  # carried by the PackedLinear
        yield key, store.get(key)


def to_runtime(q: QuantizedWeight, spec: QuantSpec) -> PackedLinear:
    """Convert an integer record into the int4 kernel's runtime layout."""
    from ..kernels.pack import pack_int4

    if spec.bits != 4:
        raise TritonqError(
            f"the int4 dequant-matmul kernel serves 4-bit weights only; this checkpoint has {spec.bits} bits"
        )
    n, k = q.shape
    if k % 8:
        raise TritonqError(f"in_features {k} is not a multiple of 8; the int4 layout packs 8 rows per word")
    g = k if spec.group_size == -1 else spec.group_size
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


def load_packed_layers(directory: str | os.PathLike) -> dict[str, PackedLinear]:
    """Every quantized linear of a packed checkpoint (any supported format) in the runtime layout."""
    return {name: to_runtime(q, spec) for name, spec, q in read_packed(directory)}
