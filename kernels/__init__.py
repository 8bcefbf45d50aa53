"""tritonq.kernels: Triton kernels, each beside its PyTorch reference, and one dispatch function per op.

Dispatch rule: CUDA tensors go to the Triton kernel, anything else to the reference. ``force`` takes one
vocabulary for every op, :data:`FORCE`: ``None`` (that rule), ``"triton"`` or ``"ref"`` (tests run the
Triton path on the CPU under ``TRITON_INTERPRET=1``). Ops with several kernels take the choice as a
separate argument (``dequant_matmul(..., kernel="gemv")``). Every bad argument raises
:class:`tritonq.errors.TritonqError`. Each kernel module declares what its Triton path accepts as
``LIMITS`` (:class:`.configs.KernelLimits`).

This package imports nothing from ``tritonq.engine`` (``tests/test_kernels.py`` checks it): the error
type lives in ``tritonq/errors.py`` and the grid rule in :mod:`.grid_rule`, below both.
Importing this package imports no kernel module: each op imports its module on first use.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

if __name__ == "kernels":  # imported by its folder name: Python runs in a checkout's root, where "" leads sys.path
    # transformers imports Hugging Face's ``kernels`` package; from a checkout's root this folder shadows it (the
    # layout card fixes the folder's name). Hand the import over to the installed package, found on the rest of
    # sys.path: the importer returns whatever sys.modules holds under the name once this file has run.
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ImportError("'kernels' here is tritonq's kernels folder (import it as tritonq.kernels), and no other "
                          "'kernels' package is installed")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)

import torch  # noqa: E402

if __name__ != "kernels":  # the one package-relative import at module level: under the name above there is no package
    from .configs import FORCE, check_force  # noqa: F401  (FORCE: the force= vocabulary, re-exported)


def use_triton(t: torch.Tensor, force: str | None = None) -> bool:
    """Whether an op on ``t`` runs its Triton kernel: ``force`` if given, else whether ``t`` is on CUDA."""
    check_force(force)
    if force is None:
        return t.is_cuda
    return force == "triton"


def hessian_accumulate(hessian: torch.Tensor, x: torch.Tensor, n_seen: int, force: str | None = None) -> int:
    """Fold a batch ``x`` [T, K] into the running-mean Hessian (fp32 [K, K], in place); returns tokens seen."""
    from . import hessian_accum

    if use_triton(x, force) and (force == "triton" or hessian_accum.kernel_usable(x)):
        return hessian_accum.hessian_accumulate_triton(hessian, x, n_seen)
    return hessian_accum.hessian_accumulate_ref(hessian, x, n_seen)


def gptq_quantize_block(
    w: torch.Tensor, u: torch.Tensor, c0: int, ncols: int, scale: torch.Tensor, zero: torch.Tensor,
    g_idx: torch.Tensor, group_size: int, maxq: int, sym: bool, fit: bool, force: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize columns ``[c0, c0+ncols)`` with in-block error feedback; see ``gptq_block.quantize_block_ref``.

    The Triton path takes at most ``gptq_block.LIMITS.max_cols`` columns per call (a :class:`TritonqError`
    beyond); :func:`tritonq.engine.hessian.blocked_quantize` splits wider blocks.
    """
    from . import gptq_block

    fn = gptq_block.quantize_block_triton if use_triton(w, force) else gptq_block.quantize_block_ref
    return fn(w, u, c0, ncols, scale, zero, g_idx, group_size, maxq, sym, fit)


def gptq_max_cols() -> int:
    """Widest block of columns one in-block GPTQ launch holds (``gptq_block.LIMITS.max_cols``)."""
    from . import gptq_block

    return gptq_block.LIMITS.max_cols


def trailing_update(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, force: str | None = None) -> None:
    """``c -= a @ b`` in place (fp32): GPTQ's lazy update of the columns after a block; with a leading batch
    axis (``c[g] -= a[g] @ b[g]``), BoA's cross-row update of every head after a block of rows."""
    from . import gptq_block

    fn = gptq_block.trailing_update_triton if use_triton(c, force) else gptq_block.trailing_update_ref
    fn(c, a, b)


def boa_sweep_rows(
    w: torch.Tensor, u: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
    g_idx: torch.Tensor, r0: int, nrows: int, group_size: int, maxq: int, sym: bool, force: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BoA's sweep of rows ``[r0, r0+nrows)`` of every head of ``w`` [G, R, K]; see ``boa_rows.boa_rows_ref``."""
    from . import boa_rows as mod

    fn = mod.boa_rows_triton if use_triton(w, force) else mod.boa_rows_ref
    return fn(w, u, coef, scale, zero, g_idx, r0, nrows, group_size, maxq, sym)


def awq_scale_loss(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int, sym: bool,
                   force: str | None = None) -> torch.Tensor:
    """AWQ's loss of every candidate scale vector ``scales`` [A, K] for the linear ``w`` [N, K] on inputs
    ``x`` [T, K]: fp32 [A]; see ``awq_search``. Grids the kernel does not take use the reference."""
    from . import awq_search

    if use_triton(w, force) and (force == "triton" or awq_search.kernel_usable(w, group_size, x)):
        return awq_search.awq_loss_triton(w, x, scales, group_size, maxq, sym)
    return awq_search.awq_loss_ref(w, x, scales, group_size, maxq, sym)


def awq_scaled_linear(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                      sym: bool, force: str | None = None) -> torch.Tensor:
    """AWQ's candidate linear outputs ``Y[a] = x (Q(w s_a) / s_a)^T`` for every candidate scale vector ``scales``
    [A, K]: [A, T, N] in ``x``'s dtype; see ``awq_search``. Grids the kernel does not take use the reference."""
    from . import awq_search

    if use_triton(w, force) and (force == "triton" or awq_search.kernel_usable(w, group_size, x)):
        return awq_search.awq_linear_triton(w, x, scales, group_size, maxq, sym)
    return awq_search.awq_linear_ref(w, x, scales, group_size, maxq, sym)


def awq_linear_usable(w: torch.Tensor, x: torch.Tensor, group_size: int, force: str | None = None) -> bool:
    """Whether :func:`awq_scaled_linear` runs its Triton kernel for these arguments (the engine's batched
    module search is the Triton path; elsewhere it keeps its reference)."""
    from . import awq_search

    return use_triton(w, force) and (force == "triton" or awq_search.kernel_usable(w, group_size, x))


def awq_clip_search(w: torch.Tensor, gram: torch.Tensor, factors: Sequence[float], group_size: int, maxq: int,
                    sym: bool, sym_clip: bool, requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    force: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's clip search of ``w`` [N, K] with the Gram blocks ``gram`` [G, g, g]: ``(lo, hi)`` [N, G]; see
    ``awq_clip``. A custom ``requantize`` or a grid the kernel does not take uses the reference."""
    from . import awq_clip as mod

    if requantize is None and use_triton(w, force) and (force == "triton" or mod.kernel_usable(w, group_size)):
        return mod.clip_triton(w, gram, factors, group_size, maxq, sym, sym_clip)
    return mod.clip_ref(w, gram, factors, group_size, maxq, sym, sym_clip, requantize)


def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                force: str | None = None) -> torch.Tensor:
    """W8A8 linear: per-token int8 quantization of ``x`` [..., K], int8 GEMM with int8 ``wq`` [N, K] and
    per-channel ``w_scale`` [N] in the epilogue; see ``int8_matmul``."""
    from . import int8_matmul

    triton_ok = use_triton(x, force) and (force == "triton" or int8_matmul.kernel_usable(x))
    fn = int8_matmul.w8a8_linear_triton if triton_ok else int8_matmul.w8a8_linear_ref
    return fn(x, wq, w_scale, bias)


def signround_qdq(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                  group: int, maxq: int, sym: bool, force: str | None = None) -> torch.Tensor:
    """AutoRound's fake quantization of ``w`` [N, K] (fp32, a constant: no gradient) with rounding ``offsets``
    [N, K] and grid factors [N, K // group], differentiable in the offsets and factors (straight-through);
    ``group`` -1 is one group per row. Triton: one forward and one backward launch (``signround.SignRoundQDQ``);
    the reference: autograd through ``signround.signround_qdq_ref``. Bad arguments raise on both paths."""
    from . import signround

    group = signround.check_args(w, offsets, min_factor, max_factor, group, maxq)
    if use_triton(w, force):
        return signround.SignRoundQDQ.apply(w.detach(), offsets, min_factor, max_factor, group, maxq, sym)
    # the reference views its inputs as [N, G, group]: contiguous copies of strided ones (the kernel's launcher too)
    return signround.signround_qdq_ref(w.detach().contiguous(), offsets.contiguous(), min_factor, max_factor, group,
                                       maxq, sym)


def hadamard_transform(x: torch.Tensor, base: torch.Tensor | None = None, force: str | None = None) -> torch.Tensor:
    """``x H^T / sqrt(n)`` along the last dimension (width ``n = m 2^k``), ``H = base (x) Sylvester(2^k)`` with an
    optional +-1 ``base`` [m, m] (``engine/orthogonal.py`` builds them): the online Hadamard of QuaRot. Triton: the
    fast Walsh-Hadamard butterflies of ``hadamard.fwht_kernel``; the reference runs the same ones in PyTorch."""
    from . import hadamard

    fn = hadamard.hadamard_transform_triton if use_triton(x, force) else hadamard.hadamard_transform_ref
    return fn(x, base)
