"""A float ``lm_head`` on the CPU decode op: fp16 weights read at half the bytes, float32 activations and sums.

On a CPU the output head of a small or medium model is a large share of the bytes a decode step reads (a
float32 2048 x 32000 head is 250 MiB, a third of TinyLlama's per-token traffic at 4 bits), and llama.cpp
keeps it in F16. :func:`use_cpu_head` replaces the head with :class:`F16Linear`, which runs
:func:`tritonq.kernels.cpu_gemv.f16_gemm`: the weights rounded once to fp16 (relative error at most 2^-11),
the products and sums in float32, every row computed the same way whatever the batch (of up to
:data:`~tritonq.kernels.cpu_gemv.GEMM_ROWS` rows: longer prompts run as one BLAS GEMM on the same fp16
values). A head the op cannot take (rows not a multiple of 16, values beyond fp16's range, a
non-``nn.Linear`` head, the op not built) stays as it is, and the reason is returned.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ...kernels import cpu_gemv


class F16Linear(nn.Module):
    """``y = x @ W^T + b`` with W held as fp16 in the CPU op's row-block layout (see ``kernels/cpu_gemv.py``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_rows", cpu_gemv.pack_f16_rows(linear.weight.detach().float()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        if self.weight_rows.dtype != torch.float16:  # a later model.to(dtype) converted the buffer
            self.weight_rows = self.weight_rows.half()
        if x.numel() // self.in_features > cpu_gemv.GEMM_ROWS:
            # a prompt or an evaluation window: compute-bound, where the BLAS GEMM on the same fp16 values is
            # ~2.4x faster than the GEMV-shaped op (measured at M = 512); decode steps stay on the op
            return nn.functional.linear(x.float(), self.dequantized_weight(), self.bias).to(x.dtype)
        return cpu_gemv.f16_gemm(x, self.weight_rows, self.bias).to(x.dtype)

    def dequantized_weight(self) -> Tensor:
        """The dense [N, K] weight the op multiplies (fp16 values, float32 tensor)."""
        blocks, k, rows = self.weight_rows.shape
        return self.weight_rows.transpose(1, 2).reshape(blocks * rows, k).float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16 on tritonq's CPU op"


def cpu_head_refusal(head: nn.Module | None) -> str | None:
    """Why :class:`F16Linear` cannot replace ``head`` (None when it can)."""
    if not isinstance(head, nn.Linear):
        return f"the output head is {type(head).__name__}, not nn.Linear"
    if head.weight.device.type != "cpu":
        return f"the output head is on {head.weight.device}"
    n, k = head.weight.shape
    if n % cpu_gemv.ROWS or k % 4:
        return f"the head's shape {n} x {k} is not a multiple of {cpu_gemv.ROWS} x 4"
    if float(head.weight.detach().abs().max()) > torch.finfo(torch.float16).max:
        return "the head has values beyond fp16's range"
    if cpu_gemv.extension() is None:
        return f"tritonq's CPU kernels did not build ({cpu_gemv.unavailable_reason()})"
    return None


def use_cpu_head(model: nn.Module) -> str | None:
    """Put the model's float output head on the fp16 CPU op; returns why not (None when done or already done).

    A tied head is untied: the input embeddings keep their float table for lookups."""
    head = model.get_output_embeddings()
    if isinstance(head, F16Linear):
        return None
    why = cpu_head_refusal(head)
    if why is None:
        model.set_output_embeddings(F16Linear(head))
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # a later tie_weights() must not undo the swap
    return why
