"""compressed-tensors ``int-quantized``: W8A8 as llm-compressor writes it for vLLM's int8 kernels.

8-bit symmetric per-channel weights of a run with 8-bit activations are stored unpacked: an int8 ``weight``
[N, K] (signed codes ``q - 128``) and ``weight_scale`` [N, 1], through the library's
``IntQuantizationCompressor`` (vllm-project/compressed-tensors ``compressors/naive_quantized/base.py``). The
layout shares ``--format compressed-tensors``: the format's class (``compressed_tensors.py``) hands it the
layers it :meth:`~IntQuantized.holds`, and the config group says ``format: int-quantized``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import TritonqError
from ..grid import GridSpec
from .ct_library import compressed_tensors_lib, matches
from .records import QuantizedWeight, check_layer, default_g_idx, signed, unsigned
from .store import TensorStore


class IntQuantized:
    """The ``int-quantized`` layout of one linear: which grids it holds, its tensors, and reading them back."""

    @staticmethod
    def holds(spec: GridSpec, activations: dict | None) -> bool:
        """Whether a layer is ``int-quantized`` (W8A8 per-channel symmetric) rather than ``pack-quantized``."""
        return bool(activations) and spec.bits == 8 and spec.sym and spec.group_size == -1 \
            and int(activations["bits"]) == 8

    def pack_layer(self, name: str, q: QuantizedWeight, scale: Tensor, scheme: object) -> dict[str, Tensor]:
        """``weight`` int8 and ``weight_scale`` from the library's compressor, checked against our codes."""
        ct = compressed_tensors_lib()
        out = ct.int_compressor.compress({"weight": q.dequantize(), "weight_scale": scale}, scheme)
        if out["weight"].dtype != torch.int8 or not torch.equal(out["weight"].to(torch.int16),
                                                                 signed(q.codes, 8).to(torch.int16)):
            raise TritonqError(f"{name}: compressed-tensors {ct.version} quantized the grid points to other "
                               "int8 codes than tritonq's; try compressed-tensors 0.20")
        return out

    def read_layer(self, store: TensorStore, name: str, groups: list,
                   ignore: list[str]) -> tuple[str, GridSpec, QuantizedWeight]:
        """One int8 layer as ``(name, grid, record)``; ``groups``: ``(targets, QuantizationArgs, _)`` per group."""
        if matches(name, ignore, linear=False):
            raise TritonqError(f"{name} has int8 weights but is listed in 'ignore'; the checkpoint is inconsistent")
        args = next((a for targets, a, _ in groups if matches(name, targets, linear=True)), None)
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
        q = QuantizedWeight(unsigned(weight.to(torch.int16), 8).to(torch.uint8), scale, torch.full((n, 1), 128.0),
                            default_g_idx(k, k), store.maybe(f"{name}.bias"))
        check_layer(name, q, spec)
        return name, spec, q
