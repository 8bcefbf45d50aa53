"""AWQ's clip search in one launch: for every output row and quantization group, the shrink factor whose clamped,
re-fitted and rounded group has the smallest output error. The PyTorch reference and the Triton kernel.

Lin et al., AWQ, MLSys 2024 (arXiv:2306.00978), llm-awq's ``auto_clip.py``; ``../shared/docs/awq_family.md``
§3.4 in its exact Gram form. For a group of ``g`` columns of row ``n``, factor ``f`` (``factors``, tried in
order) clamps ``w`` to ``[f lo0, f hi0]`` (``lo0, hi0`` the group's min and max, or ``-/+ absmax`` with
``sym_clip``), re-fits the min-max grid on the clamped group, rounds it (``q``) and scores
``err = d^T H_g d`` with ``d = q - w`` and ``H_g`` the group's ``g x g`` block of the mean ``x x^T``
(``gram`` [G, g, g]). A strictly smaller error replaces the kept range, so the first factor wins ties.

The kernel: one program per (tile of rows, group); the group's weights are loaded once, the factors are
looped inside (the candidate axis of the search), ``d H_g`` is a ``tl.dot`` with IEEE fp32 products over
column chunks of ``H_g``. The grid fit and the rounding are :mod:`.grid_fit`'s, the same fp32 operations as
the reference (:func:`.grid_rule.minmax_scale_zero`, :func:`.grid_rule.fake_quantize`); only the error's
summation order differs, so a near tie may pick a neighbouring factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from .configs import KernelLimits, LaunchConfig
from .grid_fit import fake_quantize as fake_quantize_tile
from .grid_fit import minmax_fit
from .grid_rule import MIN_SCALE, fake_quantize, minmax_scale_zero

CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=16),
    LaunchConfig.of(num_warps=8, num_stages=1, BLOCK_N=16),  # groups of 128: the [16, 128] tiles spill at 4 warps
)
# fp32 weights and Gram blocks; groups are one [GROUP, GROUP] tile of H (powers of two, 16 to 128)
LIMITS = KernelLimits(dtypes=("fp32",))
KERNEL_GROUPS = (16, 32, 64, 128)


def clip_ref(w: torch.Tensor, gram: torch.Tensor, factors: Sequence[float], group_size: int, maxq: int, sym: bool,
             sym_clip: bool, requantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the kept ``(lo, hi)`` per row and group, fp32 ``[N, G]``; every row and group at once per factor.

    ``requantize``: ``Q`` of the clamped weights ``[N, G, g]``, written over them (default: the min-max grid of
    each group; the engine passes its MSE grid fit here, which the kernel does not have).
    """
    n, k = w.shape
    g = group_size
    wg = w.float().reshape(n, k // g, g)
    if sym_clip:
        hi0 = wg.abs().amax(dim=2)
        lo0 = -hi0
    else:
        lo0, hi0 = wg.amin(dim=2), wg.amax(dim=2)
    best = torch.full(lo0.shape, math.inf, device=w.device)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for f in factors:
        lo, hi = f * lo0, f * hi0
        c = torch.minimum(wg, hi[..., None])
        torch.maximum(c, lo[..., None], out=c)
        if requantize is None:
            lo_c, hi_c = torch.aminmax(c, dim=2)
            scale, zero = minmax_scale_zero(lo_c, hi_c, maxq, sym)
            fake_quantize(c, scale[..., None], zero[..., None], maxq, inplace=True)
        else:
            c = requantize(c)
        d = c.sub_(wg)
        err = torch.einsum("ngi,gij,ngj->ng", d, gram, d)
        better = err < best  # strictly smaller: the earlier factor wins a tie
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo, best_hi


@triton.jit
def awq_clip_kernel(
    w_ptr, h_ptr, f_ptr, lo_ptr, hi_ptr, N, G, F, stride_w, maxq, min_scale,
    BLOCK_N: tl.constexpr, GROUP: tl.constexpr, KC: tl.constexpr, SYM: tl.constexpr, SYM_CLIP: tl.constexpr,
):
    """Program (rows tile, group): the best of ``F`` shrink factors for each row of the tile.

    ``d^T H_g d`` is summed over column chunks of ``KC``: ``(d @ H_g[:, chunk]) . d[:, chunk]``, the chunk's
    ``d`` recomputed from its weights (a register tile cannot be sliced), so only ``[GROUP, KC]`` of ``H_g`` is
    live at a time (a whole 128 x 128 block spills and overflows shared memory)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.program_id(1)
    cols = tl.arange(0, GROUP)
    row_ok = rows < N
    w_row = w_ptr + rows[:, None] * stride_w + grp * GROUP
    w = tl.load(w_row + cols[None, :], mask=row_ok[:, None], other=0.0)
    h_grp = h_ptr + grp * GROUP * GROUP
    if SYM_CLIP:
        hi0 = tl.max(tl.abs(w), axis=1)
        lo0 = -hi0
    else:
        lo0 = tl.min(w, axis=1)
        hi0 = tl.max(w, axis=1)
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_lo = lo0
    best_hi = hi0
    for i in range(0, F):
        f = tl.load(f_ptr + i)
        lo = f * lo0
        hi = f * hi0
        c = tl.maximum(tl.minimum(w, hi[:, None]), lo[:, None])
        scale, zero = minmax_fit(tl.min(c, axis=1), tl.max(c, axis=1), maxq, min_scale, SYM)
        d = fake_quantize_tile(c, scale[:, None], zero[:, None], maxq) - w
        err = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j0 in range(0, GROUP, KC):
            jj = j0 + tl.arange(0, KC)
            h = tl.load(h_grp + cols[:, None] * GROUP + jj[None, :])
            wj = tl.load(w_row + jj[None, :], mask=row_ok[:, None], other=0.0)
            cj = tl.maximum(tl.minimum(wj, hi[:, None]), lo[:, None])
            dj = fake_quantize_tile(cj, scale[:, None], zero[:, None], maxq) - wj
            err += tl.sum(tl.dot(d, h, input_precision="ieee") * dj, axis=1)
        better = err < best
        best = tl.where(better, err, best)
        best_lo = tl.where(better, lo, best_lo)
        best_hi = tl.where(better, hi, best_hi)
    tl.store(lo_ptr + rows * G + grp, best_lo, mask=row_ok)
    tl.store(hi_ptr + rows * G + grp, best_hi, mask=row_ok)


def pick_config(group_size: int) -> LaunchConfig:
    """16 rows per program (the group's tiles stay in registers across the factors); 8 warps for groups of 128."""
    return CONFIGS[0] if group_size <= 64 else CONFIGS[1]


def kernel_usable(w: torch.Tensor, group_size: int) -> bool:
    """Whether the kernel takes this grid (one group is one tile of H)."""
    return group_size in KERNEL_GROUPS and w.shape[1] % group_size == 0


def aot_signature(dtype: str, config: LaunchConfig, GROUP: int = 64) -> tuple[dict, dict]:
    """Argument types for ahead-of-time compilation of :func:`awq_clip_kernel`."""
    sig = {"w_ptr": "*fp32", "h_ptr": "*fp32", "f_ptr": "*fp32", "lo_ptr": "*fp32", "hi_ptr": "*fp32", "N": "i32",
           "G": "i32", "F": "i32", "stride_w": "i32", "maxq": "i32", "min_scale": "fp32", "BLOCK_N": "constexpr",
           "GROUP": "constexpr", "KC": "constexpr", "SYM": "constexpr", "SYM_CLIP": "constexpr"}
    return sig, {**config.constexprs(), "GROUP": GROUP, "KC": chunk_of(GROUP), "SYM": False, "SYM_CLIP": False}


def chunk_of(group_size: int) -> int:
    """Columns of ``H_g`` one step of the error sum loads: 16."""
    return min(group_size, 16)


def clip_triton(w: torch.Tensor, gram: torch.Tensor, factors: Sequence[float], group_size: int, maxq: int, sym: bool,
                sym_clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the semantics of :func:`clip_ref`: one launch for every row, group and factor."""
    from ..errors import TritonqError

    if not kernel_usable(w, group_size):
        raise TritonqError(f"the AWQ clip kernel takes group sizes {KERNEL_GROUPS} dividing the input width; "
                           f"got group size {group_size} for width {w.shape[1]}")
    w = w.float().contiguous()
    n, k = w.shape
    g = k // group_size
    h = gram.float().contiguous()
    f = torch.tensor(list(factors), dtype=torch.float32, device=w.device)
    lo = torch.empty(n, g, dtype=torch.float32, device=w.device)
    hi = torch.empty_like(lo)
    config = pick_config(group_size)
    meta = config.constexprs()
    grid = (triton.cdiv(n, meta["BLOCK_N"]), g)
    awq_clip_kernel[grid](w, h, f, lo, hi, n, g, f.numel(), w.stride(0), maxq, MIN_SCALE, GROUP=group_size,
                          KC=chunk_of(group_size), SYM=sym, SYM_CLIP=sym_clip, num_warps=config.num_warps,
                          num_stages=config.num_stages, **meta)
    return lo, hi
