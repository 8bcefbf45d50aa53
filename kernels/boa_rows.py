"""BoA's two-sided sweep of a block of rows: every head's rows in turn, each row's columns with GPTQ's error
feedback in lazy blocks, then the row's residual carried to the later rows of the block. PyTorch reference
and Triton kernel.

Notation (``../shared/docs/boa.md`` §2 and §10; Kim et al., BoA, arXiv:2406.13474): ``W`` [G, R, K] fp32
working weights of G heads with R rows each, ``U`` [K, K] the upper Cholesky factor of ``H_col^-1`` shared
by every head, ``coef[g, i, i'] = U_row[g][i, i'] / U_row[g][i, i]``. For rows ``i = r0 .. r0 + n - 1`` in
turn: GPTQ on row ``i`` of every head with ``U`` (grids preset per row and group: ``scale``/``zero``
[G, R, groups] read through ``g_idx``) gives ``q_i``; ``delta_i = w_i - q_i`` (``w_i`` before its sweep);
every later row ``i' < r0 + n`` of the block takes ``w_i' -= coef[:, i, i'] * delta_i``. The rows after
the block are left to one GEMM with the block's residuals, batched over heads
(``gptq_block.trailing_update_kernel``), which is exact because they are not read inside the block
(GPTQ's lazy-batch argument, applied across rows).

The kernel gives each program ``BLOCK_G`` heads and runs the whole row block in one launch: per row, a
``[BLOCK_G, BLOCK_B]`` tile of columns stays in registers for its ``BLOCK_B`` sequential steps, and the
block's errors update the rest of the row with ``tl.dot`` (GPTQ's lazy update) before the next tile loads.
So a layer takes ``R / n`` launches instead of the ``R * K`` small steps of the released code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import TritonqError
from .configs import KernelLimits, LaunchConfig
from .gptq_block import quantize_block_ref, trailing_update_ref

CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_G=16, BLOCK_B=64, BLOCK_T=32),
)
LIMITS = KernelLimits(dtypes=("fp32",))


def check_args(w: torch.Tensor, u: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, r0: int,
               nrows: int) -> None:
    heads, rows, k = w.shape
    if w.dtype != torch.float32 or u.dtype != torch.float32:
        raise TritonqError(f"the BoA row sweep works on fp32 weights and factors, got {w.dtype} and {u.dtype}")
    if u.shape != (k, k) or coef.shape != (heads, rows, rows) or scale.shape[:2] != (heads, rows):
        raise TritonqError(f"the BoA row sweep needs U [K, K], coef [G, R, R], scale [G, R, groups] for weights "
                           f"[G, R, K] = {tuple(w.shape)}; got {tuple(u.shape)}, {tuple(coef.shape)}, "
                           f"{tuple(scale.shape)}")
    if not (0 <= r0 and 1 <= nrows and r0 + nrows <= rows):
        raise TritonqError(f"rows [{r0}, {r0 + nrows}) are not inside the {rows} rows of each head")


def boa_rows_ref(w: torch.Tensor, u: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 g_idx: torch.Tensor, r0: int, nrows: int, group_size: int, maxq: int, sym: bool,
                 block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`boa_rows_kernel`; returns ``(q, delta)`` [G, nrows, K]. Rows ``[r0, r0 + nrows)``
    of ``w`` are working space (their contents after the call are not specified); no other row is touched.
    Vectorized over heads: row ``i`` of every head is one GPTQ problem [G, K] for the GPTQ block reference,
    so the Python steps are ``nrows * K``, not ``G`` times that."""
    check_args(w, u, coef, scale, r0, nrows)
    heads, _, k = w.shape
    q = torch.empty(heads, nrows, k, dtype=w.dtype, device=w.device)
    delta = torch.empty_like(q)
    for ii in range(nrows):
        i = r0 + ii
        row = w[:, i, :].clone()
        s, z = scale[:, i].contiguous(), zero[:, i].contiguous()
        for c0 in range(0, k, block):
            c1 = min(c0 + block, k)
            qb, eb = quantize_block_ref(row, u, c0, c1 - c0, s, z, g_idx, group_size, maxq, sym, False)
            q[:, ii, c0:c1] = qb
            if c1 < k:
                trailing_update_ref(row[:, c1:], eb, u[c0:c1, c1:])
        delta[:, ii] = w[:, i, :] - q[:, ii]
        if ii + 1 < nrows:
            w[:, i + 1:r0 + nrows, :].sub_(coef[:, i, i + 1:r0 + nrows, None] * delta[:, ii, None, :])
    return q, delta


@triton.jit
def boa_rows_kernel(
    w_ptr, u_ptr, coef_ptr, q_ptr, d_ptr, scale_ptr, zero_ptr, gidx_ptr,
    G, R, K, NG, r0, nrows, maxq,
    BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Heads [pid*BLOCK_G, +BLOCK_G), rows [r0, r0+nrows). Every tensor is contiguous (few scalar arguments:
    AMD targets spill scalar registers otherwise): w [G, R, K], u [K, K], coef [G, R, R], q and delta
    [G, nrows, K], scale and zero [G, R, NG].

    Row ``i`` is swept in place in ``w`` (its trailing columns take the lazy updates); ``delta`` first holds
    the row's values before the sweep, then the residual. A barrier separates every store from loads of
    the same addresses by other threads of the program.
    """
    pid = tl.program_id(0)
    heads = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_B)
    tcols = tl.arange(0, BLOCK_T)
    h_ok = heads < G
    stride_wg, stride_wr, stride_u, stride_cg, stride_cr = R * K, K, K, R * R, R
    stride_qg, stride_qr, stride_sg, stride_sr = nrows * K, K, R * NG, NG
    for ii in range(0, nrows):
        i = r0 + ii
        w_row = w_ptr + heads[:, None] * stride_wg + i * stride_wr
        d_row = d_ptr + heads[:, None] * stride_qg + ii * stride_qr
        q_row = q_ptr + heads[:, None] * stride_qg + ii * stride_qr
        for c0 in range(0, K, BLOCK_B):  # keep the row before its sweep: delta = pre - q
            m = h_ok[:, None] & ((c0 + cols) < K)[None, :]
            tl.store(d_row + (c0 + cols)[None, :], tl.load(w_row + (c0 + cols)[None, :], mask=m, other=0.0), mask=m)
        tl.debug_barrier()
        for c0 in range(0, K, BLOCK_B):
            cc = c0 + cols
            c_ok = cc < K
            m = h_ok[:, None] & c_ok[None, :]
            tile = tl.load(w_row + cc[None, :], mask=m, other=0.0)
            err = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
            qt = tl.zeros((BLOCK_G, BLOCK_B), dtype=tl.float32)
            ncols = tl.minimum(K - c0, BLOCK_B)
            for j in range(0, ncols):
                g = tl.load(gidx_ptr + c0 + j)
                s = tl.load(scale_ptr + heads * stride_sg + i * stride_sr + g, mask=h_ok, other=1.0)
                z = tl.load(zero_ptr + heads * stride_sg + i * stride_sr + g, mask=h_ok, other=0.0)
                at_j = (cols == j)[None, :]
                wj = tl.sum(tl.where(at_j, tile, 0.0), axis=1)
                x = tl.math.div_rn(wj, s)
                r = tl.floor(x + 0.5)
                # round half to even, as torch.round
                r = tl.where(((r - x) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
                code = tl.minimum(tl.maximum(r + z, 0.0), maxq.to(tl.float32))
                qj = s * (code - z)
                diag = tl.load(u_ptr + (c0 + j) * stride_u + c0 + j)
                ej = tl.math.div_rn(wj - qj, diag)
                qt = tl.where(at_j, qj[:, None], qt)
                err = tl.where(at_j, ej[:, None], err)
                u_row = tl.load(u_ptr + (c0 + j) * stride_u + cc, mask=(cols > j) & c_ok, other=0.0)
                tile = tile - ej[:, None] * u_row[None, :]
            tl.store(q_row + cc[None, :], qt, mask=m)
            pre = tl.load(d_row + cc[None, :], mask=m, other=0.0)
            res = pre - qt
            tl.store(d_row + cc[None, :], res, mask=m)
            for jj in range(ii + 1, nrows):  # the block's later rows take this tile's residual
                cf = tl.load(coef_ptr + heads * stride_cg + i * stride_cr + r0 + jj, mask=h_ok, other=0.0)
                later = w_ptr + heads[:, None] * stride_wg + (r0 + jj) * stride_wr + cc[None, :]
                tl.store(later, tl.load(later, mask=m, other=0.0) - cf[:, None] * res, mask=m)
            for t0 in range(c0 + BLOCK_B, K, BLOCK_T):  # lazy update of the rest of the row
                tt = t0 + tcols
                t_ok = tt < K
                ub = tl.load(u_ptr + cc[:, None] * stride_u + tt[None, :], mask=c_ok[:, None] & t_ok[None, :],
                             other=0.0)
                upd = tl.dot(err, ub, input_precision="ieee")
                mt = h_ok[:, None] & t_ok[None, :]
                cur = tl.load(w_row + tt[None, :], mask=mt, other=0.0)
                tl.store(w_row + tt[None, :], cur - upd, mask=mt)
            tl.debug_barrier()


def pick_config() -> LaunchConfig:
    """The one launch shape (heads per program, tile width, trailing-update chunk)."""
    return CONFIGS[0]


def aot_signature(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """AOT argument types of :func:`boa_rows_kernel` (fp32 only: the working weights)."""
    sig = {name: "*fp32" for name in ("w_ptr", "u_ptr", "coef_ptr", "q_ptr", "d_ptr", "scale_ptr", "zero_ptr")}
    sig["gidx_ptr"] = "*i32"
    for name in ("G", "R", "K", "NG", "r0", "nrows", "maxq"):
        sig[name] = "i32"
    sig.update({"BLOCK_G": "constexpr", "BLOCK_B": "constexpr", "BLOCK_T": "constexpr"})
    return sig, config.constexprs()


def boa_rows_triton(w: torch.Tensor, u: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, g_idx: torch.Tensor, r0: int, nrows: int, group_size: int, maxq: int,
                    sym: bool, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the semantics of :func:`boa_rows_ref` (``block`` is the kernel's ``BLOCK_B``;
    the lazy width does not change the result; ``group_size``/``sym`` are carried by the preset grids)."""
    check_args(w, u, coef, scale, r0, nrows)
    for name, t in (("w", w), ("u", u), ("coef", coef), ("scale", scale), ("zero", zero)):
        if not t.is_contiguous():
            raise TritonqError(f"the BoA row sweep kernel needs contiguous tensors; {name} has strides "
                               f"{tuple(t.stride())} (pass .contiguous())")
    heads, _, k = w.shape
    config = pick_config()
    meta = config.constexprs()
    q = torch.empty(heads, nrows, k, dtype=torch.float32, device=w.device)
    delta = torch.empty_like(q)
    g_idx = g_idx.to(device=w.device, dtype=torch.int32).contiguous()
    grid = (triton.cdiv(heads, meta["BLOCK_G"]),)
    boa_rows_kernel[grid](
        w, u, coef, q, delta, scale, zero, g_idx, heads, w.shape[1], k, scale.shape[2], r0, nrows, maxq,
        num_warps=config.num_warps, num_stages=config.num_stages, **meta,
    )
    return q, delta
