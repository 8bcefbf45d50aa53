"""BoA's cross-row compensation after a block of rows, as one batched matrix product: for every head ``g``,
``C[g] -= A[g] @ B[g]`` with ``C`` the later rows [G, M, K], ``A`` the coefficients ``coef[g, block, later]^T``
[G, M, n] and ``B`` the block's residuals [G, n, K] (``../shared/docs/boa.md`` §10: lazy batching across
rows is exact because the later rows are not read while the block is swept). PyTorch reference and Triton
kernel (fp32 with IEEE products, as GPTQ's trailing update in ``gptq_block.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import TritonqError
from .configs import KernelLimits, LaunchConfig

CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_M=32, BLOCK_N=64, BLOCK_K=16),
)
LIMITS = KernelLimits(dtypes=("fp32",))


def check_args(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if c.dim() != 3 or a.dim() != 3 or b.dim() != 3 or a.shape[0] != c.shape[0] or b.shape[0] != c.shape[0] \
            or a.shape[1] != c.shape[1] or b.shape[2] != c.shape[2] or a.shape[2] != b.shape[1]:
        raise TritonqError(f"the BoA cross-row update takes C [G, M, K], A [G, M, n], B [G, n, K]; got "
                           f"{tuple(c.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if any(t.dtype != torch.float32 for t in (c, a, b)):
        raise TritonqError("the BoA cross-row update works in fp32")


def cross_update_ref(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Reference of :func:`boa_cross_kernel`: ``c -= a @ b`` per head, in place."""
    check_args(c, a, b)
    c.baddbmm_(a, b, alpha=-1.0)


@triton.jit
def boa_cross_kernel(
    c_ptr, a_ptr, b_ptr, M, N, K,
    stride_cg, stride_cm, stride_cn, stride_ag, stride_am, stride_ak, stride_bg, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[g, M, N] -= A[g, M, K] @ B[g, K, N] for head g = program_id(2)."""
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


def pick_config() -> LaunchConfig:
    return CONFIGS[0]


def aot_signature(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """AOT argument types of :func:`boa_cross_kernel` (fp32 only)."""
    sig = {"c_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
    for name in ("stride_cg", "stride_cm", "stride_cn", "stride_ag", "stride_am", "stride_ak", "stride_bg",
                 "stride_bk", "stride_bn"):
        sig[name] = "i32"
    sig.update({"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"})
    return sig, config.constexprs()


def cross_update_triton(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """Triton launcher: ``c -= a @ b`` per head, in place (any strides)."""
    check_args(c, a, b)
    heads, m, n = c.shape
    k = a.shape[2]
    if m == 0 or n == 0 or k == 0:
        return
    config = pick_config()
    meta = config.constexprs()
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), heads)
    boa_cross_kernel[grid](
        c, a, b, m, n, k, *c.stride(), *a.stride(), *b.stride(),
        num_warps=config.num_warps, num_stages=config.num_stages, **meta,
    )
