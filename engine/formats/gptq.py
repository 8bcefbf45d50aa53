"""GPTQ checkpoints (``gptq`` v1 and GPTQModel's ``gptq_v2``), as AutoGPTQ, GPTQModel, transformers and vLLM read them.

Layout (formats doc §1.1): ``qweight`` int32 [K*b/32, N] packed along K, ``qzeros`` int32 [G, N*b/32]
packed along N (v1 stores ``z - 1``, v2 stores ``z``), ``scales`` fp16 [G, N], ``g_idx`` int32 [K]. Sources:
ModelCloud/GPTQModel ``nn_modules/qlinear/__init__.py`` (``pack_block``), AutoGPTQ ``qlinear_cuda_old.py``
(``zeros -= 1``).

Per-layer grids follow GPTQModel's ``dynamic`` convention (``gptqmodel/quantization/config.py``; vLLM's
``gptq_utils.get_dynamic_override`` reads it): the config's ``bits``/``group_size``/``sym`` are the grid most
layers have, and every other layer gets a positive override ``"+:^<name>$": {"bits": .., "group_size": ..,
"sym": ..}``; ``"-:<regex>"`` keys skip modules (left in float). The first matching key wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from ...errors import TritonqError
from ..grid import GridSpec
from .base import PackedFormat, majority_grid, method_of, module_pattern, qweight_layers
from .bitpack import pack_k, pack_last, unpack_k, unpack_last
from .records import QuantizedWeight, check_layer, default_g_idx, layout_key, stored_scale
from .store import TensorStore


class GptqFormat(PackedFormat):
    """GPTQ (v1: ``qzeros`` hold ``z - 1``), as AutoGPTQ, GPTQModel, transformers and vLLM read it (§1.1)."""

    name = "gptq"
    tensor_names = ("qweight", "qzeros", "scales", "g_idx")
    v2: ClassVar[bool] = False

    def check_grid(self, spec: GridSpec) -> None:
        if spec.bits not in (2, 4, 8):
            raise TritonqError(f"tritonq writes GPTQ with 2, 4 or 8 bits, got {spec.bits}; use compressed-tensors")

    def config(
        self, grids: Mapping[str, GridSpec], *, model_dtype: torch.dtype, ignore: list[str], act_order: bool,
        desc_act: bool, version: str,
    ) -> dict:
        spec = majority_grid(grids)
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
        dynamic = {}
        for m in ignore:  # GPTQModel's per-module override: "-:" skips a module (formats doc §1.1)
            if m != "lm_head":
                dynamic[f"-:^{re.escape(m)}$"] = {}
        for name, layer in grids.items():  # "+:" overrides the grid of a module
            if layout_key(layer) != layout_key(spec):
                dynamic[f"+:{module_pattern(name)}"] = {"bits": layer.bits, "group_size": layer.group_size,
                                                        "sym": layer.sym}
        if dynamic:
            cfg["dynamic"] = dynamic
        return cfg

    def pack_layer(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
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
            f"{name}.qweight": pack_k(q.codes.t(), spec.bits),
            f"{name}.qzeros": pack_last(zeros, spec.bits),
            f"{name}.scales": stored_scale(name, q.scale.t(), self.scale_dtype(model_dtype)),
            f"{name}.g_idx": q.g_idx.to(torch.int32),
        }

    def recognizes(self, qcfg: dict) -> bool:
        if method_of(qcfg) != "gptq":
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
        base = (bits, gs, bool(qcfg.get("sym", True)))
        for name, qweight, scales, qzeros in qweight_layers(store):
            bits, gs, sym = _dynamic_grid(qcfg.get("dynamic") or {}, name, base)
            if bits not in (2, 4, 8):
                raise TritonqError(f"GPTQ checkpoints with {bits} bits are not supported (2, 4 or 8)")
            spec = GridSpec(bits, gs, sym)
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
            codes = unpack_k(qweight, bits, k).t()
            zero = unpack_last(qzeros, bits, n).t().float() + (0 if self.v2 else 1)
            g_idx = store.maybe(f"{name}.g_idx")
            g_idx = default_g_idx(k, g) if g_idx is None else g_idx.to(torch.int32)
            q = QuantizedWeight(
                codes.to(torch.uint8),
                scales.float().t().contiguous(),
                zero.contiguous(),
                g_idx,
                store.maybe(f"{name}.bias"),
            )
            check_layer(name, q, spec)
            yield name, spec, q

    def side_files(self, qcfg: dict) -> dict[str, dict]:
        # GPTQModel writes the same dict as quantize_config.json, the file vLLM's GPTQ configs look for
        return {"quantize_config.json": qcfg}


class GptqV2Format(GptqFormat):
    """GPTQModel's ``gptq_v2``: ``qzeros`` hold ``z`` itself, so asymmetric zero points 0 fit (§1.1)."""

    name = "gptq_v2"
    v2 = True


def _dynamic_grid(dynamic: dict, name: str, base: tuple[int, int, bool]) -> tuple[int, int, bool]:
    """``(bits, group_size, sym)`` of module ``name`` after GPTQModel's ``dynamic`` overrides (first match wins,
    as vLLM's ``get_dynamic_override``); ``"-:"`` keys name modules without packed weights."""
    for pattern, override in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                raise TritonqError(f"{name} has packed weights but the GPTQ config skips it ({pattern!r})")
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return (int(override.get("bits", base[0])), int(override.get("group_size", base[1])),
                    bool(override.get("sym", base[2])))
    return base
