"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding packed int4 weights, and the model swap.

Forward calls :func:`tritonq.kernels.dequant_matmul.dequant_matmul` (Triton kernels on CUDA, the
PyTorch reference elsewhere). The swap follows gpt-fast's ``replace_linear_*`` + ``*Linear`` pattern
(``quantize.py``): the model skeleton is built with parameters on the meta device, quantized linears
are replaced by ``QuantLinear`` holding the checkpoint's packed tensors, and only the non-quantized
tensors are loaded, so float weights of quantized layers are never materialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import TritonqError
from .formats import PackedInt8Linear, PackedLinear


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as packed int4 (runtime layout of ``kernels/dequant_matmul.py``)."""

    def __init__(self, packed: PackedLinear, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.register_buffer("qweight", packed.qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", packed.scales.to(dtype).contiguous())
        self.register_buffer("zeros", None if packed.zeros is None else packed.zeros.to(dtype).contiguous())
        self.register_buffer("g_idx", None if packed.g_idx is None else packed.g_idx.to(torch.int32))
        self.register_buffer("bias", None if packed.bias is None else packed.bias.to(dtype))

    #: Off-GPU speed knob: keep the dequantized weight after the first call. The reference path re-dequantizes
    #: every weight on every call (~5 s per token for a 135M model on two CPU cores); the cache trades the
    #: memory saving for float speed. ``load_packed_model`` enables it on the CPU; CUDA never uses it.
    cache_dense: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.cache_dense and x.device.type != "cuda":
            dense = self.__dict__.get("_dense")
            if dense is None or dense.device != x.device or dense.dtype != x.dtype:
                dense = self.dequantized_weight().to(device=x.device, dtype=x.dtype)
                self.__dict__["_dense"] = dense  # not a buffer: never saved, never moved by .to()
            return nn.functional.linear(x, dense, None if self.bias is None else self.bias.to(x.dtype))
        from ..kernels.dequant_matmul import dequant_matmul

        return dequant_matmul(x, self.qweight, self.scales, self.zeros, group_size=self.group_size,
                              g_idx=self.g_idx, bias=self.bias)

    def dequantized_weight(self) -> Tensor:
        """Dense [N, K] weight in the buffers' dtype (for float baselines and checks)."""
        from ..kernels.dequant_matmul import dequantize_int4

        w = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.g_idx)
        return w.t().to(self.scales.dtype).contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, sym={self.zeros is None}, act_order={self.g_idx is not None}"
        )


class Int8Linear(nn.Module):
    """y = x @ W^T + b with W stored as int8 codes and one scale per output channel (W8A8, ``int-quantized``).

    Alone it runs weight-only (the dequantized weight); wrapped in ``act_quant.ActQuantLinear`` with the
    per-token symmetric 8-bit setting it runs W8A8 through :meth:`forward_act`: on CUDA the fused per-token
    quantization kernel and the int8 GEMM (``kernels/int8_matmul.py``), elsewhere their PyTorch references.
    """

    def __init__(self, packed: PackedInt8Linear, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.register_buffer("qweight", packed.weight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", packed.scale.float().contiguous())
        self.register_buffer("bias", None if packed.bias is None else packed.bias.to(dtype))

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight().to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def forward_act(self, x: Tensor, spec) -> Tensor:
        """The layer on inputs quantized as ``spec`` says; the int8 path when it is per-token sym 8-bit."""
        if spec.bits == 8 and spec.sym and spec.scheme == "per-token":
            from ..kernels import w8a8_linear

            return w8a8_linear(x, self.qweight, self.weight_scale, self.bias)
        from .act_quant import fake_quantize_activation

        return self.forward(fake_quantize_activation(x, spec))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8, per-channel, sym"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every ``nn.Parameter`` on the meta device while buffers stay real.

    Buffers such as rotary ``inv_freq`` are computed in ``__init__`` and are not in the checkpoint,
    so they must be real; parameters all come from the checkpoint or from ``QuantLinear``. (The same
    idea as accelerate's ``init_empty_weights(include_buffers=False)``.)
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def swap_linears(model: nn.Module, layers: dict[str, PackedLinear | PackedInt8Linear], dtype: torch.dtype) -> None:
    """Replace each named ``nn.Linear`` by a ``QuantLinear`` (``Int8Linear`` for int8 weights); shapes must match
    the architecture."""
    for name, packed in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, leaf)
        except AttributeError:
            raise TritonqError(
                f"checkpoint has packed weights for {name}, which the model does not have; "
                "the checkpoint does not match its config.json"
            ) from None
        if not isinstance(old, nn.Linear):
            raise TritonqError(f"{name} is a {type(old).__name__}, not a Linear; cannot hold packed weights")
        if (old.in_features, old.out_features) != (packed.in_features, packed.out_features):
            raise TritonqError(
                f"{name}: packed weight is [{packed.out_features}, {packed.in_features}] but the model "
                f"expects [{old.out_features}, {old.in_features}]; the checkpoint does not match config.json"
            )
        if (old.bias is not None) != (packed.bias is not None):
            raise TritonqError(
                f"{name}: the model {'has' if old.bias is not None else 'has no'} bias but the "
                "checkpoint disagrees"
            )
        runtime = Int8Linear if isinstance(packed, PackedInt8Linear) else QuantLinear
        setattr(parent, leaf, runtime(packed, dtype))
