"""Kernels that are wrong on purpose, for the negative tests of ``test_aot.py`` (never launched).

``spill_kernel`` keeps a [BLOCK_M, BLOCK_N] fp32 tile live in one warp (512 values per thread at
64 x 256), more than the 255 registers a thread may have, so ptxas spills. ``big_dot_kernel`` with
fp32 64 x 64 x 128 tiles and 3 stages needs 128 KB of shared memory, more than sm_86's 99 KB.
"""

import triton
import triton.language as tl


@triton.jit
def spill_kernel(x_ptr, y_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + rm[:, None] * BLOCK_N + rn[None, :]).to(tl.float32)
    s = tl.sum(x * x, axis=1)
    tl.store(y_ptr + rm[:, None] * BLOCK_N + rn[None, :], x / s[:, None])


@triton.jit
def big_dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)
