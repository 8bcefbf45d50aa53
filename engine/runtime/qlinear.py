"""``QuantLinear``: a drop-in ``nn.Linear`` replacement holding packed int4 weights, and the model swap.

Forward calls :func:`tritonq.kernels.dequant_matmul.dequant_matmul` (Triton kernels on CUDA, the
PyTorch reference elsewhere), or, once :meth:`QuantLinear.use_cpu_int4` has repacked the layer for the
CPU, one of two CPU ops: tritonq's own (:mod:`tritonq.kernels.cpu_gemv`: int8 activations in blocks of 32
against the 4-bit codes, llama.cpp's Q4_1 x Q8_1 arithmetic, batch-invariant; the default where it builds)
or PyTorch's (``aten._weight_int4pack_mm_for_cpu``: bf16 activations and scales). The swap follows
gpt-fast's ``replace_linear_*`` + ``*Linear`` pattern (``quantize.py``): the model skeleton is built with
parameters on the meta device, quantized linears are replaced by ``QuantLinear`` holding the
checkpoint's packed tensors, and only the non-quantized tensors are loaded, so float weights of
quantized layers are never materialised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ...errors import TritonqError
from ..formats.records import DenseLinear, PackedInt8Linear, PackedLinear

#: Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts, largest first. A larger group size that one of
#: them divides (per channel included) runs exactly by repeating each scale over its sub-groups.
CPU_INT4_GROUPS = (256, 128, 64, 32)
#: ``_convert_weight_to_int4pack_for_cpu`` packs output rows in blocks of this many.
CPU_INT4_N_MULTIPLE = 16
#: The CPU ops :meth:`QuantLinear.use_cpu_int4` may choose: ``auto`` takes tritonq's where it builds and takes the
#: layout, else PyTorch's.
CPU_INT4_KERNELS = ("auto", "tritonq", "aten")
#: The op's ``innerKTiles`` argument: a tiling hint of the CUDA layout that the CPU packing ignores; 2 is a
#: value every K the group sizes allow accepts on CUDA too.
_INNER_K_TILES = 2


def cpu_int4_group(in_features: int, out_features: int, group_size: int, g_idx: Tensor | None) -> int | str:
    """The group size the CPU int4 op runs this layout with, or why it cannot take the layout.

    ``g_idx`` (act-order) is accepted when it is a permutation of static groups: every group index
    ``0..K/group_size-1`` occurs exactly ``group_size`` times. Sorting the input features by group then
    gives plain consecutive groups (the input is permuted the same way at every call, as exllama does).
    """
    k, n = in_features, out_features
    gs = k if group_size == -1 else group_size
    if n % CPU_INT4_N_MULTIPLE:
        return f"out_features={n} is not a multiple of {CPU_INT4_N_MULTIPLE}"
    if gs <= 0 or k % gs:
        return f"group_size={gs} does not divide in_features={k}"
    sub = next((h for h in CPU_INT4_GROUPS if gs % h == 0), None)
    if sub is None:
        return f"group_size={gs} is not a multiple of one of {CPU_INT4_GROUPS}"
    if g_idx is not None:
        counts = torch.bincount(g_idx.long().cpu(), minlength=k // gs)
        if counts.numel() != k // gs or bool((counts != gs).any()):
            return "g_idx is not a permutation of static groups (some group has more or fewer than group_size inputs)"
    return sub


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored as packed int4.

    Two storage layouts. As built: the runtime layout of ``kernels/dequant_matmul.py`` (``qweight``,
    ``scales``, ``zeros``, ``g_idx``), served by the Triton kernels on CUDA and their PyTorch reference
    elsewhere. After :meth:`use_cpu_int4` (``load_packed_model`` calls it on the CPU): PyTorch's CPU int4
    layout (``weight_int4pack`` uint8 [N, K/2], ``scales_and_zeros`` bf16 [G, N, 2]) served by
    ``aten._weight_int4pack_mm_for_cpu``; the GPTQ tensors are dropped, so the layer holds about half a
    byte per weight and no dense copy, and nothing is dequantized per call.
    """

    def __init__(self, packed: PackedLinear, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.group_size = packed.group_size
        self.sym = packed.zeros is None
        self.act_order = packed.g_idx is not None
        self.dtype = dtype
        self.register_buffer("qweight", packed.qweight.to(torch.int32).contiguous())
        self.register_buffer("scales", packed.scales.to(dtype).contiguous())
        self.register_buffer("zeros", None if packed.zeros is None else packed.zeros.to(dtype).contiguous())
        self.register_buffer("g_idx", None if packed.g_idx is None else packed.g_idx.to(torch.int32))
        self.register_buffer("bias", None if packed.bias is None else packed.bias.to(dtype))
        self.register_buffer("weight_int4pack", None)
        self.register_buffer("scales_and_zeros", None)
        self.register_buffer("rows_weight", None)  # tritonq's CPU layout: uint8 codes, fp16 scale and min
        self.register_buffer("rows_scale", None)
        self.register_buffer("rows_min", None)
        self.register_buffer("input_order", None)  # int64 [K]: input features sorted by group (act-order)
        self.cpu_group_size: int | None = None
        #: Why the CPU int4 op cannot take this layer (None when it can); set by :meth:`use_cpu_int4`.
        self.cpu_int4_refused: str | None = None

    @property
    def uses_cpu_int4(self) -> bool:
        return self.weight_int4pack is not None or self.rows_weight is not None

    @property
    def cpu_kernel(self) -> str | None:
        """The CPU op this layer runs on (``"tritonq"`` or ``"aten"``), None before :meth:`use_cpu_int4`."""
        return "tritonq" if self.rows_weight is not None else "aten" if self.weight_int4pack is not None else None

    def use_cpu_int4(self, kernel: str = "auto") -> bool:
        """Repack for a CPU int4 op (``kernel``: one of :data:`CPU_INT4_KERNELS`) and drop the GPTQ tensors;
        False (layer unchanged, reason in ``cpu_int4_refused``) when no allowed op can take the layout."""
        if kernel not in CPU_INT4_KERNELS:
            raise TritonqError(f"kernel must be one of {CPU_INT4_KERNELS}, got {kernel!r}")
        if self.uses_cpu_int4:
            return True
        if self.qweight.device.type != "cpu":
            self.cpu_int4_refused = f"the layer is on {self.qweight.device}, not the CPU"
            return False
        if kernel != "aten":
            why = self._use_tritonq_op()
            if why is None or kernel == "tritonq":
                self.cpu_int4_refused = why
                return why is None
        return self._use_aten_op()

    def _codes_in_group_order(self) -> Tensor:
        """Codes [K, N] with the input features sorted by group (setting ``input_order`` for act-order)."""
        from ...kernels.pack import unpack_int4

        codes = unpack_int4(self.qweight)  # uint8 [K, N]
        if self.g_idx is not None:
            order = torch.sort(self.g_idx.long(), stable=True).indices
            if not torch.equal(order, torch.arange(self.in_features)):  # a default g_idx needs no reordering
                codes = codes[order]
                self.input_order = order
        return codes

    def _drop_runtime_tensors(self) -> None:
        self.qweight = self.scales = self.zeros = self.g_idx = None
        self.cpu_int4_refused = None

    def _use_tritonq_op(self) -> str | None:
        """Repack for :func:`tritonq.kernels.cpu_gemv.int4_gemm` (``w = scale * q + min``, fp16 scale and
        min per group); the reason when it cannot."""
        from ...kernels import cpu_gemv

        gs = self.in_features if self.group_size == -1 else self.group_size
        why = cpu_gemv.supports(self.in_features, self.out_features, gs)
        if why is None and self.g_idx is not None:
            why = cpu_int4_group(self.in_features, self.out_features, self.group_size, self.g_idx)
            why = why if isinstance(why, str) else None
        if why is None and cpu_gemv.extension() is None:
            why = f"tritonq's CPU kernels did not build ({cpu_gemv.unavailable_reason()})"
        if why is not None:
            return why
        codes = self._codes_in_group_order()
        scale = self.scales.float()
        zero = self.zeros.float() if self.zeros is not None else torch.full_like(scale, 8.0)
        self.rows_weight, self.rows_scale, self.rows_min = cpu_gemv.pack_int4_rows(
            codes.t().contiguous(), scale, -scale * zero, gs)
        self.cpu_group_size = gs
        self._drop_runtime_tensors()
        return None

    def _use_aten_op(self) -> bool:
        """Repack for ``aten._weight_int4pack_mm_for_cpu``; False (reason in ``cpu_int4_refused``) when the op
        cannot take the layout.

        The op computes ``w = (q - 8) * s + zf`` per group with bf16 ``s`` and ``zf``; the GPTQ grid
        ``w = s * (q - z)`` is the same line with ``zf = s * (8 - z)`` (symmetric: z = 8, zf = 0). Both are
        rounded to bf16 from the stored scales, so the result is not bit-exact against fp16 scales
        (relative error up to 2^-9 on s and on zf).
        """
        sub = cpu_int4_group(self.in_features, self.out_features, self.group_size, self.g_idx)
        if isinstance(sub, str):
            self.cpu_int4_refused = sub
            return False
        codes = self._codes_in_group_order()
        scale = self.scales.float()
        zero = self.zeros.float() if self.zeros is not None else torch.full_like(scale, 8.0)
        rep = self.group_size // sub  # per channel: group_size == K
        if rep > 1:
            scale = scale.repeat_interleave(rep, dim=0)
            zero = zero.repeat_interleave(rep, dim=0)
        self.weight_int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.t().to(torch.int32).contiguous(), _INNER_K_TILES)
        self.scales_and_zeros = torch.stack([scale, scale * (8.0 - zero)], dim=-1).to(torch.bfloat16).contiguous()
        self.cpu_group_size = sub
        self._drop_runtime_tensors()
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_cpu_int4:
            return self._forward_cpu_int4(x)
        from ...kernels.dequant_matmul import dequant_matmul

        return dequant_matmul(x, self.qweight, self.scales, self.zeros, group_size=self.group_size,
                              g_idx=self.g_idx, bias=self.bias)

    def _forward_cpu_int4(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise TritonqError(f"this QuantLinear was repacked for the CPU int4 op but got input on {x.device}; "
                               "load the checkpoint again with the target device")
        if x.shape[-1] != self.in_features:
            raise TritonqError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.input_order is not None:
            x2 = x2.index_select(1, self.input_order)
        if self.rows_weight is not None:
            from ...kernels.cpu_gemv import int4_linear

            if self.rows_scale.dtype != torch.float16:  # a later model.to(dtype) converted the buffers
                self.rows_scale, self.rows_min = self.rows_scale.half(), self.rows_min.half()
            y = int4_linear(x2, self.rows_weight, self.rows_scale, self.rows_min, self.cpu_group_size, self.bias)
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if self.scales_and_zeros.dtype != torch.bfloat16:  # a later model.to(dtype) converted the buffer
            self.scales_and_zeros = self.scales_and_zeros.to(torch.bfloat16)
        # the op's fast path takes bf16 activations and scales; its output is bf16, cast back to x's dtype
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), self.weight_int4pack, self.cpu_group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> Tensor:
        """Dense [N, K] weight in the layer's dtype (for float baselines and checks); in the CPU int4 layout,
        exactly the weights the op uses (fp16 scale and min for tritonq's op, bf16 scale and zero for aten's)."""
        if not self.uses_cpu_int4:
            from ...kernels.dequant_matmul import dequantize_int4

            w = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.g_idx)
            return w.t().to(self.dtype).contiguous()
        if self.rows_weight is not None:
            from ...kernels.cpu_gemv import unpack_int4_rows

            w = unpack_int4_rows(self.rows_weight, self.rows_scale.half(), self.rows_min.half(), self.cpu_group_size)
            if self.input_order is not None:
                w = torch.empty_like(w).index_copy_(1, self.input_order, w)
            return w.to(self.dtype).contiguous()
        k, gs = self.in_features, self.cpu_group_size
        # the codes back from the op itself: identity input, unit scale, zero 8 -> (q - 8) * 1 + 8 = q (exact)
        unit = torch.ones_like(self.scales_and_zeros)
        unit[..., 1] = 8.0
        eye = torch.eye(k, dtype=torch.bfloat16)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4pack, gs, unit).float()  # [K, N]
        sz = self.scales_and_zeros.float()
        g = torch.arange(k) // gs
        w = (codes - 8.0) * sz[g, :, 0] + sz[g, :, 1]  # [K', N] in the sorted input order
        if self.input_order is not None:
            w = torch.empty_like(w).index_copy_(0, self.input_order, w)
        return w.t().to(self.dtype).contiguous()

    def extra_repr(self) -> str:
        kernel = f", cpu_int4(group={self.cpu_group_size}) on {self.cpu_kernel}" if self.uses_cpu_int4 else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits=4, "
            f"group_size={self.group_size}, sym={self.sym}, act_order={self.act_order}{kernel}"
        )


def use_cpu_int4(model: nn.Module, kernel: str = "auto") -> dict[str, str]:
    """Repack every ``QuantLinear`` of a CPU model for a CPU int4 op (see :meth:`QuantLinear.use_cpu_int4`);
    returns ``{name: reason}`` for the layers no allowed op can take (they keep the reference dequant-matmul)."""
    refused = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and not mod.use_cpu_int4(kernel):
            refused[name] = mod.cpu_int4_refused
    return refused


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
        #: the weight-only kernel of ``forward``: None the fp32 reference (``kernels/int8_weight.py``), "cpu_bf16"
        #: PyTorch's int8 CPU op (:meth:`use_cpu_bf16`), "cpu_gemv" tritonq's (:meth:`use_cpu_op`)
        self.kernel: str | None = None
        self.register_buffer("scale_bf16", None)
        self.register_buffer("rows_weight", None)  # tritonq's CPU int8 layout (:meth:`use_cpu_op`)

    def use_cpu_op(self) -> bool:
        """Run ``forward`` on tritonq's CPU int8 op (``kernels/cpu_gemv``: int8 activations per block of 32,
        batch-invariant), falling back to PyTorch's (:meth:`use_cpu_bf16`) where it cannot take the shape or did
        not build. The int8 codes stay (a tied embedding table may share them)."""
        from ...kernels import cpu_gemv

        if (self.qweight.device.type == "cpu" and self.out_features % cpu_gemv.ROWS == 0
                and self.in_features % cpu_gemv.X_BLOCK == 0 and cpu_gemv.extension() is not None):
            self.rows_weight = cpu_gemv.pack_int8_rows(self.qweight)
            self.kernel = "cpu_gemv"
            return True
        return self.use_cpu_bf16()

    def use_cpu_bf16(self) -> bool:
        """Run ``forward`` on PyTorch's int8 CPU op (bf16 activations and scales, as the int4 CPU op); False
        (layer unchanged) where the op cannot take the width."""
        from ...kernels.int8_weight import cpu_bf16_takes

        if self.qweight.device.type != "cpu" or not cpu_bf16_takes(self.in_features):
            return False
        self.kernel = "cpu_bf16"
        self.scale_bf16 = self.weight_scale.to(torch.bfloat16)
        return True

    def dequantized_weight(self) -> Tensor:
        return self.qweight.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        """Weight-only: the int8 codes times the input, scaled per output row; no dequantized weight per call."""
        from ...kernels.int8_weight import int8_weight_linear

        if self.rows_weight is not None:
            from ...kernels.cpu_gemv import int8_gemm, runs_on_op

            if runs_on_op(x.numel() // self.in_features):
                return int8_gemm(x, self.rows_weight, self.weight_scale, self.bias).to(x.dtype)
            # an evaluation window or a long prompt: float32 activations on the codes (the reference), as int4_linear
            return int8_weight_linear(x, self.qweight, self.weight_scale, self.bias)
        return int8_weight_linear(x, self.qweight, self.weight_scale, self.bias, self.kernel, self.scale_bf16)

    def forward_act(self, x: Tensor, spec) -> Tensor:
        """The layer on inputs quantized as ``spec`` says; the int8 path when it is per-token sym 8-bit."""
        if spec.bits == 8 and spec.sym and spec.scheme == "per-token":
            from ...kernels import w8a8_linear

            return w8a8_linear(x, self.qweight, self.weight_scale, self.bias)
        from ..activations import fake_quantize_activation

        return self.forward(fake_quantize_activation(x, spec))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8, per-channel, sym"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 codes with one scale per row (``--quantize-head``): a lookup dequantizes
    only the gathered rows, ``scale[id] * codes[id]``, in the model's dtype."""

    def __init__(self, packed: PackedInt8Linear, dtype: torch.dtype = torch.float16,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings = packed.out_features
        self.embedding_dim = packed.in_features
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("qweight", packed.weight.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", packed.scale.float().contiguous())

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.qweight[ids].float() * self.weight_scale[ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def share_table(self, head: Int8Linear) -> bool:
        """Use ``head``'s int8 table when it holds the same codes and scales (an int8 head of a tied model);
        the two tables then take the memory of one. Returns whether they were shared."""
        if head.qweight.shape != self.qweight.shape or not torch.equal(head.qweight, self.qweight) \
                or not torch.equal(head.weight_scale, self.weight_scale):
            return False
        self.qweight, self.weight_scale = head.qweight, head.weight_scale
        return True

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, per-row, sym"


def swap_embeddings(model: nn.Module, layers: dict[str, PackedInt8Linear | PackedLinear | DenseLinear],
                    dtype: torch.dtype) -> set[str]:
    """Replace each ``nn.Embedding`` named in ``layers`` by an :class:`Int8Embedding`; returns the names taken
    (the rest are linears for :func:`swap_linears`). Only an int8 per-row table is accepted."""
    taken = set()
    for name, packed in layers.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf, None)
        if not isinstance(old, nn.Embedding):
            continue
        if not isinstance(packed, PackedInt8Linear):
            raise TritonqError(f"{name} is an embedding table; tritonq loads it only as int8 symmetric per row "
                               "(--quantize-head), and the checkpoint stores another grid")
        if (old.num_embeddings, old.embedding_dim) != (packed.out_features, packed.in_features):
            raise TritonqError(f"{name}: the checkpoint's table is [{packed.out_features}, {packed.in_features}], "
                               f"the model's [{old.num_embeddings}, {old.embedding_dim}]")
        setattr(parent, leaf, Int8Embedding(packed, dtype, old.padding_idx))
        taken.add(name)
    return taken


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


def dense_linear(packed: DenseLinear, dtype: torch.dtype) -> nn.Linear:
    """A float ``nn.Linear`` holding a record's dequantized weight: the path of grids no packed kernel serves
    (e.g. 8-bit groups). Exact to the fake-quantized model in its dtype, without the memory saving."""
    lin = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None, device="meta")
    lin.weight = nn.Parameter(packed.weight.to(dtype).contiguous(), requires_grad=False)
    if packed.bias is not None:
        lin.bias = nn.Parameter(packed.bias.to(dtype), requires_grad=False)
    return lin


def swap_linears(model: nn.Module, layers: dict[str, PackedLinear | PackedInt8Linear | DenseLinear],
                 dtype: torch.dtype) -> None:
    """Replace each named ``nn.Linear`` by a ``QuantLinear`` (``Int8Linear`` for int8 weights, a float
    ``nn.Linear`` for :class:`DenseLinear`); shapes must match the architecture."""
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
        if isinstance(packed, DenseLinear):
            setattr(parent, leaf, dense_linear(packed, dtype))
            continue
        runtime = Int8Linear if isinstance(packed, PackedInt8Linear) else QuantLinear
        setattr(parent, leaf, runtime(packed, dtype))
