"""tritonq.kernels: Triton kernels, each beside its PyTorch reference, and one dispatch function per op.

Dispatch rule: CUDA tensors go to the Triton kernel, anything else to the reference. ``force="triton"``
or ``force="ref"`` overrides it (tests run the Triton path on the CPU under ``TRITON_INTERPRET=1``).
Importing this package imports no kernel module: each op imports its module on first use.
"""

from __future__ import annotations

import torch


def use_triton(t: torch.Tensor, force: str | None = None) -> bool:
    if force is None:
        return t.is_cuda
    if force not in ("triton", "ref"):
        raise ValueError(f"force must be None, 'triton' or 'ref', got {force!r}")
    return force == "triton"


def hessian_accumulate(hessian: torch.Tensor, x: torch.Tensor, n_seen: int, force: str | None = None) -> int:
    """Fold a batch ``x`` [T, K] into the running-mean Hessian (fp32 [K, K], in place); returns tokens seen."""
    from . import hessian_accum

    if use_triton(x, force) and (force == "triton" or hessian_accum.kernel_usable(x)):
        return hessian_accum.hessian_accumulate_triton(hessian, x, n_seen)
    return hessian_accum.hessian_accumulate_ref(hessian, x, n_seen)


def gptq_quantize_block(w, u, c0, ncols, scale, zero, g_idx, group_size, maxq, sym, fit, force=None):
    """Quantize columns ``[c0, c0+ncols)`` with in-block error feedback; see ``gptq_block.quantize_block_ref``."""
    from . import gptq_block

    fn = gptq_block.quantize_block_triton if use_triton(w, force) else gptq_block.quantize_block_ref
    return fn(w, u, c0, ncols, scale, zero, g_idx, group_size, maxq, sym, fit)


def trailing_update(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, force: str | None = None) -> None:
    """``c -= a @ b`` in place (fp32): GPTQ's lazy update of the columns after a block."""
    from . import gptq_block

    fn = gptq_block.trailing_update_triton if use_triton(c, force) else gptq_block.trailing_update_ref
    fn(c, a, b)
