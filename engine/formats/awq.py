"""AutoAWQ GEMM checkpoints: packed along N with the interleaved nibble order, no g_idx (formats doc §1.2).

``qweight`` int32 [K, N/8] and ``qzeros`` int32 [G, N/8] packed along N with the order ``[0, 2, 4, 6, 1, 3,
5, 7]``, ``scales`` fp16 [G, N]. Source: casper-hansen/AutoAWQ ``awq/modules/linear/gemm.py``,
``awq/utils/packing_utils.py``. The AWQ config holds one grid for the whole model (no per-module override),
so a run with several grids is refused before calibration.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ...errors import TritonqError
from ..grid import GridSpec
from .base import FormatRequest, PackedFormat, distinct_grids, method_of, qweight_layers
from .bitpack import awq_pack, awq_unpack
from .records import QuantizedWeight, check_layer, default_g_idx, is_default_g_idx, stored_scale
from .store import TensorStore


class AwqFormat(PackedFormat):
    """AutoAWQ GEMM: packed along N with the interleaved nibble order, no g_idx (formats doc §1.2)."""

    name = "awq"
    tensor_names = ("qweight", "qzeros", "scales")

    def check_grids(self, grids: Mapping[str, GridSpec]) -> None:
        specs = distinct_grids(grids.values())
        if len(specs) > 1:
            raise TritonqError(
                f"the AWQ config holds one grid for the whole model; this run has {len(specs)} (e.g. "
                f"{specs[0].bits} and {specs[1].bits} bits). Use --format compressed-tensors or gptq_v2 for "
                "per-layer grids"
            )
        for spec in specs:
            self.check_grid(spec)

    def check(self, request: FormatRequest) -> None:
        super().check(request)
        if request.act_order_groups == "dynamic":  # known before work: refuse here, not after the quantization
            raise TritonqError("AWQ has no g_idx and cannot store group act-order (--act-order dynamic); quantize "
                               "with --act-order static, or use --format gptq_v2 or compressed-tensors")

    def check_grid(self, spec: GridSpec) -> None:
        if spec.bits != 4 or spec.group_size == -1:
            raise TritonqError(
                f"AWQ GEMM stores 4-bit grouped weights only (got {spec.bits} bits, group size "
                f"{spec.group_size}); use --format compressed-tensors or gptq_v2"
            )

    def config(
        self, grids: Mapping[str, GridSpec], *, model_dtype: torch.dtype, ignore: list[str], act_order: bool,
        desc_act: bool, version: str,
    ) -> dict:
        (spec,) = distinct_grids(grids.values())
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": spec.group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": ignore or None,
        }

    def pack_layer(self, name: str, q: QuantizedWeight, spec: GridSpec, model_dtype: torch.dtype) -> dict[str, Tensor]:
        if not is_default_g_idx(q.g_idx, spec.effective_group(q.shape[1])):
            raise TritonqError(
                f"{name}: AWQ has no g_idx and cannot store group act-order; use --format gptq_v2 or "
                "compressed-tensors, or quantize with static act-order"
            )
        return {
            f"{name}.qweight": awq_pack(q.codes.t().to(torch.int64)),
            f"{name}.qzeros": awq_pack(q.zero.t().to(torch.int64)),
            f"{name}.scales": stored_scale(name, q.scale.t(), self.scale_dtype(model_dtype)),
        }

    def recognizes(self, qcfg: dict) -> bool:
        if method_of(qcfg) != "awq":
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
        for name, qweight, scales, qzeros in qweight_layers(store):
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
                default_g_idx(k, g),
                store.maybe(f"{name}.bias"),
            )
            check_layer(name, q, spec)
            yield name, spec, q
