"""Blocked GPTQ error propagation: quantize a block of columns with in-block error feedback, then the
trailing (lazy) update of the remaining columns. PyTorch references and Triton kernels.

Notation (Frantar et al., GPTQ, arXiv:2210.17323, Algorithm 1): ``W`` [N, K] fp32 working weights,
``U`` [K, K] the upper Cholesky factor of ``H^-1``. For a block of columns ``[c0, c0 + B)`` and each
column ``i`` in it: ``q_i = Q(w_i)``, ``e_i = (w_i - q_i) / U_ii``, ``W[:, i+1:c0+B] -= e_i U[i, i+1:c0+B]``.
After the block, ``W[:, c0+B:] -= E U[c0:c0+B, c0+B:]`` (one GEMM). Rows are independent inside a
block, so the Triton kernel gives each program a tile of rows and keeps the whole ``[rows, B]`` tile in
registers for all ``B`` sequential steps: one launch per block instead of ~10 per column.

The grid (``engine/grid.py`` conventions) is either fitted in the kernel at the first column of every
group from the up-to-date working tile (``FIT``; blocks start at group starts; the rule is
:func:`.grid_rule.minmax_scale_zero`, transcribed once for every kernel in :mod:`.grid_fit` and tested
bit-exact against it), or
read per column from precomputed ``scale``/``zero`` [N, G] through ``g_idx`` (``PRESET``: per-channel
grids, static groups with act-order). The same two kernels serve BoA's two-sided updates
(``../shared/docs/boa.md`` §10): the trailing update is a general ``C -= A @ B``, batched over heads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import TritonqError
from .configs import KernelLimits, LaunchConfig
from .grid_fit import fake_quantize, minmax_fit
from .grid_rule import MIN_SCALE, minmax_scale_zero

REF_SUB_BLOCK = 16  # lazy sub-block width of the CPU reference
# (x + 1.5 * 2^23) - 1.5 * 2^23 rounds an fp32 x half-to-even, as torch.round, for |x| < 2^22, and keeps
# the sign and a magnitude of at least 2^22 beyond: after the clamp to the grid (|bounds| < 2^22) the
# result equals clamp(round(x)) for every x (inf and nan included). Two vectorised adds, where
# torch.round is a scalar loop on the CPU (5x slower at N = 3072).
_ROUNDER = 1.5 * 2.0**23

# In-block kernel: BLOCK_N rows per program, BLOCK_B >= the block width (power of two).
BLOCK_CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=16, BLOCK_B=128),
    LaunchConfig.of(num_warps=8, num_stages=1, BLOCK_N=16, BLOCK_B=256),
)
# Trailing update GEMM C -= A @ B in fp32.
UPDATE_CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
)
CONFIGS = BLOCK_CONFIGS + UPDATE_CONFIGS

# The in-block kernel keeps the whole [BLOCK_N, BLOCK_B] tile in registers, so one launch holds at most
# the largest BLOCK_B columns; with FIT a group must lie inside one launch. Wider lazy blocks are split
# into launches of at most ``max_cols`` columns by the engine (``engine/hessian.py:blocked_quantize``),
# and wider groups are fitted on the host. Both kernels work on the fp32 working copy of the weights.
LIMITS = KernelLimits(dtypes=("fp32",), max_cols=max(c.constexprs()["BLOCK_B"] for c in BLOCK_CONFIGS))


def check_launch(c0: int, ncols: int, group_size: int, fit: bool, width_limit: bool = True) -> None:
    """Raise :class:`TritonqError` for a block the in-block kernel cannot take (see :data:`LIMITS`).

    ``width_limit=False`` skips the column limit (the CPU reference holds any width).
    """
    if width_limit and not 1 <= ncols <= LIMITS.max_cols:
        raise TritonqError(
            f"the GPTQ block kernel takes 1 to {LIMITS.max_cols} columns per launch, got {ncols}; split wider "
            "blocks into sub-blocks with a trailing update between them, as engine/hessian.py:blocked_quantize does"
        )
    if fit and (c0 % group_size or ncols % group_size):
        raise TritonqError(
            f"fitting grids in the GPTQ block kernel needs whole groups in one launch: columns [{c0}, {c0 + ncols}) "
            f"do not start and end on multiples of the group size {group_size}; fit such groups on the host "
            "and pass fit=False"
        )


def quantize_block_ref(
    w: torch.Tensor, u: torch.Tensor, c0: int, ncols: int, scale: torch.Tensor, zero: torch.Tensor,
    g_idx: torch.Tensor, group_size: int, maxq: int, sym: bool, fit: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`gptq_block_kernel` on columns ``[c0, c0 + ncols)`` of ``w`` [N, K].

    Returns ``(q, err)``: the fake-quantized block [N, ncols] and the scaled errors [N, ncols].
    With ``fit`` the group grids are fitted here and written into ``scale``/``zero`` [N, G].
    ``w`` is not modified. The tile is kept transposed ([ncols, N], one column per contiguous row) so that
    each step is a contiguous row read and one rank-1 BLAS update: this is the engine's CPU path.
    """
    check_launch(c0, ncols, group_size, fit, width_limit=False)
    tile = w[:, c0:c0 + ncols].t().contiguous()
    u_blk = u[c0:c0 + ncols, c0:c0 + ncols]
    q_out = torch.empty_like(tile)
    err_out = torch.empty_like(tile)
    groups = g_idx[c0:c0 + ncols]
    diag = torch.diagonal(u_blk).tolist()
    if not fit:  # every column's grid as one contiguous row: no strided gather inside the loop
        groups_long = groups.long()
        scale_t, zero_t = scale[:, groups_long].t().contiguous(), zero[:, groups_long].t().contiguous()
        low_t, high_t = -zero_t, maxq - zero_t
    # Lazy sub-blocks: rank-1 updates stay inside SUB columns, one GEMM updates the rest of the block.
    # Sub-blocks start at group starts, so a group is always fitted on fully updated columns.
    sub = math.gcd(group_size, REF_SUB_BLOCK) if fit else REF_SUB_BLOCK
    s = z = None
    for b0 in range(0, ncols, sub):
        b1 = min(b0 + sub, ncols)
        for i in range(b0, b1):
            if not fit:
                s, low, high = scale_t[i], low_t[i], high_t[i]
            elif (c0 + i) % group_size == 0:
                grp = tile[i:i + group_size]
                s, z = minmax_scale_zero(grp.amin(dim=0), grp.amax(dim=0), maxq, sym)
                g = int(groups[i])
                scale[:, g] = s
                zero[:, g] = z
                low, high = -z, maxq - z
            wi, qi, ei = tile[i], q_out[i], err_out[i]
            # q = s * (clamp(round(w / s) + z, 0, maxq) - z) = s * clamp(round(w / s), -z, maxq - z): z is an
            # integer, so both are exact in fp32; e = (w - q) / U_ii. Written in place: the CPU loop is
            # bounded by per-op overhead, not arithmetic. round() is the magic-number form (see _ROUNDER).
            torch.div(wi, s, out=qi)
            qi.add_(_ROUNDER).sub_(_ROUNDER).clamp_(low, high).mul_(s)
            torch.sub(wi, qi, out=ei).div_(diag[i])
            if i + 1 < b1:
                tile[i + 1:b1].addr_(u_blk[i, i + 1:b1], ei, alpha=-1.0)
        if b1 < ncols:
            tile[b1:].addmm_(u_blk[b0:b1, b1:].t(), err_out[b0:b1], alpha=-1.0)
    return q_out.t(), err_out.t()


def check_update_args(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``C -= A @ B`` takes C [M, N], A [M, K], B [K, N], or the same with a leading batch axis, all fp32."""
    batched = c.dim() == 3
    if c.dim() not in (2, 3) or a.dim() != c.dim() or b.dim() != c.dim() or (batched and not (
            a.shape[0] == b.shape[0] == c.shape[0])) or a.shape[-2] != c.shape[-2] or b.shape[-1] != c.shape[-1] \
            or a.shape[-1] != b.shape[-2]:
        raise TritonqError(f"the trailing update takes C [(G,) M, N], A [(G,) M, K], B [(G,) K, N]; got "
                           f"{tuple(c.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if any(t.dtype != torch.float32 for t in (c, a, b)):
        raise TritonqError("the trailing update works in fp32")


def trailing_update_ref(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Reference of :func:`trailing_update_kernel`: ``c -= a @ b`` in place (fp32), per batch entry when 3-D."""
    check_update_args(c, a, b)
    if c.dim() == 3:
        c.baddbmm_(a, b, alpha=-1.0)
    else:
        c.sub_(a @ b)


@triton.jit
def gptq_block_kernel(
    w_ptr, u_ptr, q_ptr, e_ptr, scale_ptr, zero_ptr, gidx_ptr,
    N, c0, ncols, stride_w, stride_u, stride_q, stride_e, stride_s, group_size, maxq, min_scale,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, FIT: tl.constexpr, SYM: tl.constexpr,
):
    """Rows [pid*BLOCK_N, +BLOCK_N) of one GPTQ block. q: [N, ncols] (stride_q); e: err^T [ncols, N]."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_B)
    row_ok = rows < N
    col_ok = cols < ncols
    tile = tl.load(w_ptr + rows[:, None] * stride_w + (c0 + cols)[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, ncols):
        g = tl.load(gidx_ptr + c0 + i)
        if FIT:
            if (c0 + i) % group_size == 0:
                in_grp = (cols >= i) & (cols < i + group_size) & col_ok
                lo = tl.min(tl.where(in_grp[None, :], tile, float("inf")), axis=1)
                hi = tl.max(tl.where(in_grp[None, :], tile, float("-inf")), axis=1)
                s, z = minmax_fit(lo, hi, maxq, min_scale, SYM)
                tl.store(scale_ptr + rows * stride_s + g, s, mask=row_ok)
                tl.store(zero_ptr + rows * stride_s + g, z, mask=row_ok)
        else:
            s = tl.load(scale_ptr + rows * stride_s + g, mask=row_ok, other=1.0)
            z = tl.load(zero_ptr + rows * stride_s + g, mask=row_ok, other=0.0)
        wi = tl.sum(tl.where((cols == i)[None, :], tile, 0.0), axis=1)
        qi = fake_quantize(wi, s, z, maxq)
        d = tl.load(u_ptr + (c0 + i) * stride_u + c0 + i)
        ei = tl.math.div_rn(wi - qi, d)
        tl.store(q_ptr + rows * stride_q + i, qi, mask=row_ok)
        tl.store(e_ptr + i * stride_e + rows, ei, mask=row_ok)
        u_row = tl.load(u_ptr + (c0 + i) * stride_u + c0 + cols, mask=(cols > i) & col_ok, other=0.0)
        tile = tile - ei[:, None] * u_row[None, :]


@triton.jit
def trailing_update_kernel(
    c_ptr, a_ptr, b_ptr, M, N, K,
    stride_cg, stride_cm, stride_cn, stride_ag, stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[g] -= A[g] @ B[g] for batch entry g = program_id(2), fp32 with IEEE products: GPTQ's lazy update of
    the columns after a block (one entry, batch strides 0) and BoA's cross-row update of every head at once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + g * stride_ag + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + g * stride_bg + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = c_ptr + g * stride_cg + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(offs, tl.load(offs, mask=mask, other=0.0) - acc, mask=mask)


def pick_config(block_width: int) -> LaunchConfig:
    """In-block kernel config: the smallest BLOCK_B that holds the block (at most ``LIMITS.max_cols``)."""
    check_launch(0, block_width, 1, False)
    return next(c for c in BLOCK_CONFIGS if block_width <= c.constexprs()["BLOCK_B"])


def pick_update_config() -> LaunchConfig:
    """Trailing-update GEMM config (one tile shape serves every width)."""
    return UPDATE_CONFIGS[0]


def aot_signature(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """AOT argument types of :func:`gptq_block_kernel` (``dtype`` must be fp32: the working weights)."""
    sig = {
        "w_ptr": "*fp32", "u_ptr": "*fp32", "q_ptr": "*fp32", "e_ptr": "*fp32", "scale_ptr": "*fp32",
        "zero_ptr": "*fp32", "gidx_ptr": "*i32", "N": "i32", "c0": "i32", "ncols": "i32", "stride_w": "i32",
        "stride_u": "i32", "stride_q": "i32", "stride_e": "i32", "stride_s": "i32", "group_size": "i32",
        "maxq": "i32", "min_scale": "fp32",
        "BLOCK_N": "constexpr", "BLOCK_B": "constexpr", "FIT": "constexpr", "SYM": "constexpr",
    }
    return sig, {**config.constexprs(), "FIT": True, "SYM": False}


def aot_signature_update(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """AOT argument types of :func:`trailing_update_kernel` (fp32 only)."""
    sig = {"c_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
    sig.update({name: "i32" for name in ("stride_cg", "stride_cm", "stride_cn", "stride_ag", "stride_am", "stride_ak",
                                         "stride_bg", "stride_bk", "stride_bn")})
    sig.update({"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"})
    return sig, config.constexprs()


def quantize_block_triton(
    w: torch.Tensor, u: torch.Tensor, c0: int, ncols: int, scale: torch.Tensor, zero: torch.Tensor,
    g_idx: torch.Tensor, group_size: int, maxq: int, sym: bool, fit: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the semantics of :func:`quantize_block_ref`."""
    check_launch(c0, ncols, group_size, fit)
    n = w.shape[0]
    # the kernel assumes unit column strides; a Cholesky factor is often a transposed view
    w, u = w.contiguous(), u.contiguous()
    config = pick_config(ncols)
    q = torch.empty((n, ncols), device=w.device, dtype=torch.float32)
    e_t = torch.empty((ncols, n), device=w.device, dtype=torch.float32)
    grid = (triton.cdiv(n, config.constexprs()["BLOCK_N"]),)
    gptq_block_kernel[grid](
        w, u, q, e_t, scale, zero, g_idx, n, c0, ncols, w.stride(0), u.stride(0), q.stride(0), e_t.stride(0),
        scale.stride(0), group_size, maxq, MIN_SCALE, FIT=fit, SYM=sym,
        num_warps=config.num_warps, num_stages=config.num_stages, **config.constexprs(),
    )
    return q, e_t.t()


def trailing_update_triton(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Triton launcher: ``c -= a @ b`` in place (any strides), per batch entry when 3-D."""
    check_update_args(c, a, b)
    if c.dim() == 2:  # one batch entry: batch strides 0
        c, a, b = c.unsqueeze(0), a.unsqueeze(0), b.unsqueeze(0)
    batch, m, n = c.shape
    k = a.shape[2]
    if m == 0 or n == 0 or k == 0:
        return
    config = pick_update_config()
    meta = config.constexprs()
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), batch)
    trailing_update_kernel[grid](
        c, a, b, m, n, k, *c.stride(), *a.stride(), *b.stride(),
        num_warps=config.num_warps, num_stages=config.num_stages, **meta,
    )
