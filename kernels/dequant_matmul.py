"""W4A16 dequant-matmul ``y = x @ W + bias`` with packed int4 W: the PyTorch reference, Triton kernels
(a split-K GEMV for decoding, a tiled GEMM for prefill), their launcher and the dispatch.

Arguments (the contract every caller codes against)
---------------------------------------------------
- ``x``: [..., K] fp16/bf16 (fp32 is accepted by the reference path only); output [..., N] in x's dtype.
- ``qweight``: int32 [K // 8, N], packed along K: nibble ``j`` (bits 4j..4j+3, LSB first) of word
  ``[r, n]`` holds the unsigned code of input row ``8r + j`` (GPTQ's ``qweight``; the transpose of
  compressed-tensors' ``weight_packed``; see :mod:`tritonq.kernels.pack`).
- ``scales``: [G, N] fp16/bf16 (fp32 allowed), ``G = K // group_size``; ``group_size == K`` (or -1)
  means per channel; other group sizes are positive multiples of 8 (``LIMITS``). ``zeros``: [G, N]
  floats holding the integer zero point z in 0..15, or ``None`` for the symmetric grid (z = 8).
- ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = k // group_size``, or ``g = g_idx[k]``
  when ``g_idx`` (int32 [K], act-order) is given; then ``G`` must be ``ceil(K / group_size)``.
- ``force``: the package's one vocabulary (``tritonq.kernels.FORCE``): ``None`` (CUDA fp16/bf16 tensors
  -> Triton kernels, anything else -> reference), ``"triton"`` or ``"ref"``; ``kernel``: ``None`` (the
  dispatcher picks), ``"gemv"`` or ``"gemm"`` (:data:`KERNEL_CHOICES`), for the Triton path.

For the AOT catalog: two kernels, ``dequant_gemv_kernel`` / ``dequant_gemm_kernel`` (also ``KERNELS``),
with ``GEMV_CONFIGS`` / ``GEMM_CONFIGS`` (``CONFIGS`` is both), ``aot_signature_gemv`` /
``aot_signature_gemm`` (or ``aot_signature``, which tells them apart with ``kernel_for(config)``) and
``aot_attrs(signature)`` for the 16-divisibility hints. ``pick_config(M, K, N, group_size, dtype,
num_sms=, capability=)`` returns a :class:`Plan` (kernel, config, split_k, per_k); ``grid(plan, M, N, K)``
is (output tiles, K splits, 1) for both kernels and ``k_split(plan, K)`` the clamped split.

The file runs past 400 lines because it is one op: both kernels share the in-register dequantization, the
launcher, the config choice and the reference they are tested against (one file per op, as gemlite does).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import TritonqError, warn
from .configs import KernelLimits, LaunchConfig, check_force
from .pack import unpack_int4

__all__ = ["CONFIGS", "GEMM_CONFIGS", "GEMV_CONFIGS", "KERNELS", "KERNEL_CHOICES", "LIMITS", "Plan", "aot_signature",
           "candidates", "dequant_matmul", "dequant_matmul_ref", "dequant_matmul_triton", "dequantize_int4", "grid",
           "k_split", "kernel_for", "pick_config", "aot_attrs"]

# The Triton kernels: 16-bit activations; 4-bit codes, 8 to an int32 word along K, so K and the group size
# are multiples of 8 (a group never splits a packed word). The reference also takes fp32 activations.
LIMITS = KernelLimits(dtypes=("fp16", "bf16"), bits=(4,), group_multiple=8, k_multiple=8)
KERNEL_CHOICES: tuple[str | None, ...] = (None, "gemv", "gemm")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _effective_group(group_size: int, K: int) -> int:
    """The group size along K: -1 (per channel) means one group of all K inputs."""
    return K if group_size == -1 else group_size


def _check_args(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                g_idx: Tensor | None, bias: Tensor | None) -> int:
    """Validate shapes, dtypes and devices; return the effective group size (per channel -> K)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise TritonqError(f"qweight must be int32 [K // 8, N], got {qweight.dtype} of shape "
                           f"{tuple(qweight.shape)}; pack codes with tritonq.kernels.pack.pack_int4")
    K = x.shape[-1]
    N = qweight.shape[1]
    if K % LIMITS.k_multiple != 0:
        raise TritonqError(f"K (x.shape[-1]) must be a multiple of {LIMITS.k_multiple} for int4 packing, got K={K}; "
                           f"pad the input features to a multiple of {LIMITS.k_multiple}")
    if qweight.shape[0] * 8 != K:
        raise TritonqError(f"qweight has {qweight.shape[0]} packed rows = {qweight.shape[0] * 8} inputs, "
                           f"but x has K={K}; qweight must be [K // 8, N] packed along K")
    if x.dtype not in _FLOATS:
        raise TritonqError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    gs = _effective_group(group_size, K)
    if gs <= 0 or gs % LIMITS.group_multiple != 0:
        raise TritonqError(f"group_size must be a positive multiple of {LIMITS.group_multiple}, or -1 (per channel), "
                           f"got {group_size}")
    if g_idx is None:
        if K % gs != 0:
            raise TritonqError(f"group_size={gs} does not divide K={K}; without g_idx groups must tile K "
                               "exactly (use group_size=-1 for per channel)")
        G = K // gs
    else:
        G = -(-K // gs)
        if g_idx.shape != (K,) or g_idx.dtype not in (torch.int32, torch.int64):
            raise TritonqError(f"g_idx must be an int32 tensor of shape ({K},), got {g_idx.dtype} "
                               f"{tuple(g_idx.shape)}")
    if scales.dim() != 2 or tuple(scales.shape) != (G, N) or scales.dtype not in _FLOATS:
        raise TritonqError(f"scales must be a float [G, N] = [{G}, {N}] tensor for K={K}, group_size={gs}, "
                           f"got {scales.dtype} {tuple(scales.shape)}")
    if zeros is not None and tuple(zeros.shape) != (G, N):
        raise TritonqError(f"zeros must have the shape of scales [{G}, {N}] (or be None for symmetric), "
                           f"got {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise TritonqError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("g_idx", g_idx),
                    ("bias", bias)):
        if t is not None and t.device != x.device:
            raise TritonqError(f"{name} is on {t.device} but x is on {x.device}; "
                               "move all tensors to one device")
    return gs


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int,
                    g_idx: Tensor | None = None) -> Tensor:
    """Dense fp32 weight [K, N] from the packed form: ``s[g, n] * (q[k, n] - z[g, n])``."""
    q = unpack_int4(qweight).float()
    K = q.shape[0]
    gs = _effective_group(group_size, K)
    g = torch.arange(K, device=q.device) // gs if g_idx is None else g_idx.long()
    s = scales.float()[g]
    z = zeros.float()[g] if zeros is not None else 8.0
    return (q - z) * s


def dequant_matmul_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, *,
                       group_size: int, g_idx: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Reference: dequantize to fp32, matmul in fp32, add bias, cast to x's dtype."""
    _check_args(x, qweight, scales, zeros, group_size, g_idx, bias)
    w = dequantize_int4(qweight, scales, zeros, group_size, g_idx)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)



# ----------------------------------------------------------------------------------------------------
# Triton kernels. Neither calls another @triton.jit function (the AOT catalog rebuilds each kernel from
# its raw function), so the int4 unpacking is written out in both.
#
# Unpacking: a tile of packed words w [BKP, BN] (BKP = BLOCK_K // 8 packed rows) becomes codes
# q [BKP, 8, BN] by shifting a broadcast copy by 4j for nibble j; row (r, j) is input row 8r + j.
# The GEMV turns codes into floats with the exponent trick ``bitcast(q | 0x4B000000) - 2^23`` (exact for
# q < 2^23; saves the int->float conversion, as Marlin's and exllama's fp16 "1024 + q" trick does) and
# factors the group's scale and zero out of the K tile: sum_k x_k s (q_k - z) = s (sum_k x_k q_k -
# z sum_k x_k), so the per-weight work is shift, mask, or, subtract, FMA (GemLite's (q - z) s per weight
# costs two more). That needs every K tile to sit inside one group (BLOCK_K divides group_size); act-order
# (g_idx) and odd group sizes take the PER_K branch, which gathers a scale and zero for every weight.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def dequant_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, tiles_per_split, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_ZEROS: tl.constexpr, PER_K: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """Split-K GEMV: program (n-tile x m-tile, K split) reduces its K range on CUDA cores in fp32.

    The weight tile is [BLOCK_K // 8, BLOCK_N] int32 with N contiguous; with BLOCK_N = 128 * num_warps
    each thread holds 4 consecutive words of every packed row (one 128-bit load per row) and the whole
    K extent of the tile, so the K reduction stays inside the thread. ATOMIC: add fp32 partial sums into
    a zeroed fp32 output (split-K); otherwise store the final row in the output dtype.
    """
    BKP: tl.constexpr = BLOCK_K // 8
    m_tiles = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % m_tiles  # m fastest: m-tiles sharing a weight tile run back to back (L2)
    pid_n = tl.program_id(0) // m_tiles
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BKP)
    jj = tl.arange(0, 8)
    n_mask = rn < N
    m_mask = rm < M
    k_tiles = tl.cdiv(K, BLOCK_K)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        kp = t * BKP + rr                                   # packed rows of this tile
        kk = kp[:, None] * 8 + jj[None, :]                  # [BKP, 8] input rows
        w = tl.load(w_ptr + kp[:, None] * N + rn[None, :], mask=(kp < K // 8)[:, None] & n_mask[None, :],
                    other=0, eviction_policy="evict_first")
        q = (w[:, None, :] >> (jj * 4)[None, :, None]) & 0xF  # [BKP, 8, BN]
        qf = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        xv = tl.load(x_ptr + rm[:, None, None] * stride_xm + kk[None, :, :],
                     mask=m_mask[:, None, None] & (kk < K)[None, :, :], other=0.0).to(tl.float32)
        if PER_K:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + kk, mask=kk < K, other=0)
            else:
                g = kk // group_size
            sz_off = g[:, :, None] * N + rn[None, None, :]
            sz_mask = (kk < K)[:, :, None] & n_mask[None, None, :]
            sc = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                wd = (qf - tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)) * sc
            else:
                wd = (qf - 8.0) * sc
            acc += tl.sum(tl.sum(xv[:, :, :, None] * wd[None, :, :, :], axis=2), axis=1)
        else:
            g = (t * BLOCK_K) // group_size
            sc = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            part = tl.sum(tl.sum(xv[:, :, :, None] * qf[None, :, :, :], axis=2), axis=1)  # [BM, BN]
            xs = tl.sum(tl.sum(xv, axis=2), axis=1)                                       # [BM]
            if HAS_ZEROS:
                zp = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
                acc += sc[None, :] * (part - zp[None, :] * xs[:, None])
            else:
                acc += sc[None, :] * (part - 8.0 * xs[:, None])
    if HAS_BIAS:
        bv = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bv = bv * (pid_k == 0).to(tl.float32)
        acc += bv[None, :]
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def dequant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, gidx_ptr, bias_ptr, out_ptr,
    M, N, K, group_size, tiles_per_split, stride_xm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_AFTER_DOT: tl.constexpr,
    HAS_ZEROS: tl.constexpr, PER_K: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Tiled GEMM on tensor cores: the B tile is dequantized in registers, ``tl.dot`` accumulates in fp32.

    Grouped path with SCALE_AFTER_DOT: B holds the exact small integers ``q - z`` in x's dtype and the
    group scale multiplies the fp32 partial product of the tile (one multiply per output instead of one
    per weight, and no rounding of ``s (q - z)`` to 16 bits); it needs a second BM x BN fp32 register
    tile, so the 128-row tile (which spills with it on sm_86) scales B instead. PER_K path: B = ``s (q - z)``
    per weight, rounded to x's dtype.
    Programs are swizzled in groups of GROUP_M row tiles for L2 reuse (Triton matmul tutorial); axis 1
    splits K (ATOMIC: fp32 atomics into a zeroed output, as GemLite's GEMM_SPLITK). UPCAST_DOT feeds
    ``tl.dot`` fp32 copies of both tiles: the launcher sets it only for bf16 under TRITON_INTERPRET=1,
    whose ``tl.dot`` (triton 3.9) multiplies the raw uint16 bit patterns of bf16 tiles; compiled code
    never uses it.
    """
    BKP: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.max_contiguous(tl.multiple_of(rn, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BKP)
    jj = tl.arange(0, 8)
    m_mask = rm < M
    n_mask = rn < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    t_start = pid_k * tiles_per_split
    t_end = tl.minimum(t_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t_start, t_end):
        kk = t * BLOCK_K + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & (kk < K)[None, :],
                    other=0.0)
        kp = t * BKP + rr
        w = tl.load(w_ptr + kp[:, None] * N + rn[None, :], mask=(kp < K // 8)[:, None] & n_mask[None, :],
                    other=0)
        q = tl.reshape((w[:, None, :] >> (jj * 4)[None, :, None]) & 0xF, (BLOCK_K, BLOCK_N))
        if PER_K:
            if HAS_GIDX:
                g = tl.load(gidx_ptr + kk, mask=kk < K, other=0)
            else:
                g = kk // group_size
            sz_off = g[:, None] * N + rn[None, :]
            sz_mask = (kk < K)[:, None] & n_mask[None, :]
            sc = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zp = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            else:
                zp = 8.0
            b = ((q.to(tl.float32) - zp) * sc).to(x_ptr.dtype.element_ty)
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        elif not SCALE_AFTER_DOT:
            g = (t * BLOCK_K) // group_size
            sc = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zp = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            else:
                zp = tl.full((BLOCK_N,), 8.0, tl.float32)
            b = ((q.to(tl.float32) - zp[None, :]) * sc[None, :]).to(x_ptr.dtype.element_ty)
            if UPCAST_DOT:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        else:
            g = (t * BLOCK_K) // group_size
            sc = tl.load(s_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            # int -> fp32 -> x dtype: exact for |q - z| <= 15; the interpreter (triton 3.9) reinterprets
            # the bits of a direct int32 -> bf16 cast instead of converting the value.
            if HAS_ZEROS:
                zi = tl.load(z_ptr + g * N + rn, mask=n_mask, other=0.0).to(tl.int32)
                b = (q - zi[None, :]).to(tl.float32).to(x_ptr.dtype.element_ty)
            else:
                b = (q - 8).to(tl.float32).to(x_ptr.dtype.element_ty)
            if UPCAST_DOT:
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") * sc[None, :]
            else:
                acc += tl.dot(a, b) * sc[None, :]
    if HAS_BIAS:
        bv = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if ATOMIC:
            bv = bv * (pid_k == 0).to(tl.float32)
        acc += bv[None, :]
    o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------------------------
# Launch configurations and the dispatch rule
# ----------------------------------------------------------------------------------------------------

GEMV_MAX_M = 8           # decode batches up to this many rows take the GEMV (issue 4: batch 1-8)
GEMV_CTAS_PER_SM = 4     # occupancy the GEMV grid is sized for: 4 CTAs x 4 warps = 16 warps per SM
GEMM_CTAS_PER_SM = 1     # a GEMM tile keeps an SM busy on its own; split K only below one wave
MAX_SPLIT_K = 64
DEFAULT_NUM_SMS = 132    # H100 SXM; used when no GPU is visible (interpreter, AOT catalog)


def _gemv_config(block_m: int, block_k: int, num_warps: int) -> LaunchConfig:
    # BLOCK_N = 128 * num_warps: 32 threads x 4 words per warp row, warps side by side along N.
    return LaunchConfig.of(num_warps=num_warps, num_stages=1, BLOCK_M=block_m, BLOCK_N=128 * num_warps,
                           BLOCK_K=block_k)


def _gemm_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> LaunchConfig:
    return LaunchConfig.of(num_warps=num_warps, num_stages=num_stages, BLOCK_M=block_m, BLOCK_N=block_n,
                           BLOCK_K=block_k, GROUP_M=8, SCALE_AFTER_DOT=int(block_m < 128))


# GEMV: every thread holds the x tile of its rows (BLOCK_M * BLOCK_K values), so BLOCK_M * BLOCK_K <= 64
# bounds registers (sm_90, 4 warps: 80 registers at BLOCK_M=1, 128 at BLOCK_M=4; BLOCK_K=128 needs 154 and
# BLOCK_M=8 spills); BLOCK_K is further capped by the group size (one scale row per K tile). Rows 5-8
# run as two m-tiles of 4 that read the same weight tile back to back.
GEMV_BLOCK_M_MAX = 4
GEMV_CONFIGS: tuple[LaunchConfig, ...] = tuple(
    _gemv_config(bm, bk, w)
    for bm in (1, 2, 4) for bk in (16, 32, 64) if bm * bk <= 64 for w in (2, 4))
# GEMM: one small-M tile for 9-16 rows (split K fills the GPU), a middle and a large tile; BLOCK_K 32 or
# 64 keeps shared memory (A + packed W per stage, plus the dequantized B) under 64 KB (AMD LDS).
# The 128-row tile keeps BLOCK_K = 32: with 64 it spills 8 bytes on sm_86 (255 registers).
_GEMM_TILES = ((16, 64, 4, 3, 64), (64, 128, 4, 3, 64), (128, 128, 8, 2, 32))  # BM, BN, warps, stages, max BK
GEMM_CONFIGS: tuple[LaunchConfig, ...] = tuple(
    _gemm_config(bm, bn, bk, w, s) for (bm, bn, w, s, bk_max) in _GEMM_TILES for bk in (32, 64) if bk <= bk_max)
CONFIGS: tuple[LaunchConfig, ...] = GEMV_CONFIGS + GEMM_CONFIGS


@dataclass(frozen=True)
class Plan:
    """What the launcher runs: the kernel, its compile-time config, the K split and the group mode."""

    kernel: str           # "gemv" or "gemm"
    config: LaunchConfig
    split_k: int          # programs along K (1: no atomics, output written in x's dtype)
    per_k: bool           # gather a scale per weight (act-order, or no BLOCK_K fits the group size)


def _block_k(group_size: int, K: int, cap: int, choices: tuple[int, ...], per_k: bool) -> tuple[int, bool]:
    """Largest BLOCK_K <= cap such that one K tile sits in one group; (choice, per_k) after falling back."""
    fits = [bk for bk in choices if bk <= cap]
    if per_k or group_size >= K:  # act-order gathers anyway; one group (per channel) always fits
        return fits[-1], per_k
    for bk in reversed(fits):
        if group_size % bk == 0:
            return bk, False
    return fits[-1], True


def _split(tiles: int, k_tiles: int, target: int) -> int:
    """Smallest power-of-two split that brings the grid to ``target`` programs, without empty splits."""
    split = 1
    while tiles * split < target and split * 2 <= min(k_tiles, MAX_SPLIT_K):
        split *= 2
    per = -(-k_tiles // split)
    return -(-k_tiles // per)


def pick_config(M: int, K: int, N: int, group_size: int, dtype: torch.dtype = torch.float16, *,
                act_order: bool = False, num_sms: int = DEFAULT_NUM_SMS, capability: tuple[int, int] = (9, 0),
                kernel: str | None = None, num_warps: int = 4) -> Plan:
    """Heuristic plan for one call; the launcher's default (autotuning on a GPU starts from it).

    GEMV for M <= GEMV_MAX_M, GEMM above; on sm_75 every M takes the GEMV, which runs on CUDA cores:
    Triton 3.9 emits no tensor-core instruction there for fp16 or bf16 ``tl.dot`` (the AOT report shows
    FMA only), and the 64x128 GEMM tile spills on sm_75. The K split is the smallest power of two that
    fills ``num_sms`` at the target occupancy (GEMV_CTAS_PER_SM / GEMM_CTAS_PER_SM), as required on sm_90 4096 x 14336.
    """
    gs = _effective_group(group_size, K)
    if kernel is None:
        no_mma = tuple(capability) < (8, 0)
        kernel = "gemv" if M <= GEMV_MAX_M or no_mma else "gemm"
    if kernel == "gemv":
        bm = min(GEMV_BLOCK_M_MAX, triton.next_power_of_2(max(M, 1)))
        bk, per_k = _block_k(gs, K, 64 // bm, (16, 32, 64), act_order)
        config = _gemv_config(bm, bk, num_warps)
        tiles = triton.cdiv(N, 128 * num_warps) * triton.cdiv(M, bm)
        target = num_sms * GEMV_CTAS_PER_SM
    elif kernel == "gemm":
        bm, bn, w, s, bk_max = _GEMM_TILES[0 if M <= 16 else 1 if M <= 64 else 2]
        bk, per_k = _block_k(gs, K, bk_max, (32, 64), act_order)
        config = _gemm_config(bm, bn, bk, w, s)
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, bm)
        target = num_sms * GEMM_CTAS_PER_SM
    else:
        raise TritonqError(f"kernel must be 'gemv' or 'gemm', got {kernel!r}")
    return Plan(kernel, config, _split(tiles, triton.cdiv(K, bk), target), per_k)


def k_split(plan: Plan, K: int) -> tuple[int, int]:
    """(programs along K, K tiles per program), clamped so that no program gets an empty K range."""
    k_tiles = triton.cdiv(K, plan.config.constexprs()["BLOCK_K"])
    per = triton.cdiv(k_tiles, plan.split_k)
    return triton.cdiv(k_tiles, per), per


def grid(plan: Plan, M: int, N: int, K: int) -> tuple[int, int, int]:
    """Launch grid of ``plan``: (output tiles, K splits, 1) for both kernels (GEMV tiles: n-major, m fastest;
    GEMM tiles: swizzled in groups of GROUP_M rows)."""
    meta = plan.config.constexprs()
    return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), k_split(plan, K)[0], 1)


KERNELS = {"gemv": dequant_gemv_kernel, "gemm": dequant_gemm_kernel}


def kernel_for(config: LaunchConfig) -> str:
    """'gemv' or 'gemm': which kernel a config from CONFIGS belongs to."""
    return "gemm" if "GROUP_M" in config.constexprs() else "gemv"


def aot_signature(dtype: str, config: LaunchConfig, *, atomic: bool = True,
                  per_k: bool = False) -> tuple[dict, dict]:
    """Argument types and constexprs of ``KERNELS[kernel_for(config)]`` for ``triton.compile``.

    The variants the catalog compiles (``catalog._dequant_plans``): split K or not (``atomic``: fp32 atomic
    output; ``atomic=False`` is what a plan with ``split_k == 1`` launches) and the scale gather
    (``per_k``). The other flags are fixed at the hot path: asymmetric groups in x's dtype, no act-order,
    no bias (their other settings only remove loads).
    """
    signature = {
        "x_ptr": f"*{dtype}", "w_ptr": "*i32", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}", "gidx_ptr": "*i32",
        "bias_ptr": f"*{dtype}", "out_ptr": "*fp32" if atomic else f"*{dtype}",
        "M": "i32", "N": "i32", "K": "i32", "group_size": "i32", "tiles_per_split": "i32",
        "stride_xm": "i32", "stride_om": "i32",
    }
    flags = {"HAS_ZEROS": True, "PER_K": per_k, "HAS_GIDX": False, "HAS_BIAS": False, "ATOMIC": atomic}
    if kernel_for(config) == "gemm":
        flags["UPCAST_DOT"] = False
    constexprs = {**config.constexprs(), **flags}
    params = inspect.signature(KERNELS[kernel_for(config)].fn).parameters  # keep the kernel's order
    return {name: signature.get(name, "constexpr") for name in params}, constexprs


_ALIGNED_INTS = ("N", "K", "group_size", "stride_xm", "stride_om")


def aot_attrs(signature: dict) -> dict:
    """``attrs`` for ``ASTSource``: 16-divisibility of every pointer and of N, K, group size and strides.

    This is what the JIT specializes at run time for Llama-like shapes (torch allocations are 256-byte
    aligned; N, K and group sizes are multiples of 16). Without it the compiler cannot prove that a row
    of ``qweight`` starts on a 16-byte boundary and emits 32-bit instead of 128-bit weight loads.
    """
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if ty.startswith("*") or name in _ALIGNED_INTS}


def aot_signature_gemv(dtype: str, config: LaunchConfig, **variant: bool) -> tuple[dict, dict]:
    assert kernel_for(config) == "gemv"
    return aot_signature(dtype, config, **variant)


def aot_signature_gemm(dtype: str, config: LaunchConfig, **variant: bool) -> tuple[dict, dict]:
    assert kernel_for(config) == "gemm"
    return aot_signature(dtype, config, **variant)


# ----------------------------------------------------------------------------------------------------
# Launcher, per-shape tuning cache, dispatch
# ----------------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch(plan: Plan, x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, gs: int,
            g_idx: Tensor | None, bias: Tensor | None) -> Tensor:
    M, K = x2.shape
    N = qweight.shape[1]
    meta = plan.config.constexprs()
    split, tiles_per_split = k_split(plan, K)
    atomic = split > 1
    out = torch.zeros((M, N), device=x2.device, dtype=torch.float32) if atomic else \
        torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    KERNELS[plan.kernel][grid(plan, M, N, K)](
        x2, qweight, scales, scales if zeros is None else zeros, qweight if g_idx is None else g_idx,
        scales if bias is None else bias, out,
        M, N, K, gs, tiles_per_split, x2.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, PER_K=plan.per_k, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None,
        ATOMIC=atomic, num_warps=plan.config.num_warps, num_stages=plan.config.num_stages, **meta,
        **({"UPCAST_DOT": x2.dtype == torch.bfloat16 and _interpreted()} if plan.kernel == "gemm" else {}),
    )
    return out.to(x2.dtype) if atomic else out


def _check_plan(plan: Plan, K: int, gs: int, has_gidx: bool) -> None:
    if plan.config not in (GEMV_CONFIGS if plan.kernel == "gemv" else GEMM_CONFIGS):
        raise TritonqError(f"config {plan.config.label()} is not one of the {plan.kernel} CONFIGS")
    bk = plan.config.constexprs()["BLOCK_K"]
    if not plan.per_k and (has_gidx or (gs < K and gs % bk != 0)):
        raise TritonqError(f"plan with BLOCK_K={bk} needs per_k=True for group_size={gs}"
                           f"{' and g_idx' if has_gidx else ''}")
    if plan.split_k < 1:
        raise TritonqError(f"split_k must be >= 1, got {plan.split_k}")


_TUNED: dict[str, Plan] = {}
_TUNE_FILE_LOADED: set[str] = set()


def candidates(base: Plan, M: int, K: int, N: int, gs: int, dtype: torch.dtype, act_order: bool,
               num_sms: int, capability: tuple[int, int], forced: bool) -> list[Plan]:
    """A handful of neighbours of the heuristic plan: other warp counts / tiles, half and double split;
    for 2-8 rows and no forced kernel, the small-M GEMM competes with the GEMV.

    The autotuner times these on a GPU; the AOT catalog compiles them (``catalog._dequant_plans``).
    """
    plans = [base]
    if base.kernel == "gemv":
        if triton.next_power_of_2(max(M, 1)) < 4:  # 2 warps with 4+ rows spill on every NVIDIA target (AOT)
            plans.append(pick_config(M, K, N, gs, dtype, act_order=act_order, num_sms=num_sms,
                                     capability=capability, kernel="gemv", num_warps=2))
        if not forced and M > 1 and tuple(capability) >= (8, 0):
            plans.append(pick_config(M, K, N, gs, dtype, act_order=act_order, num_sms=num_sms,
                                     capability=capability, kernel="gemm"))
    else:
        for m_hint in (16, 64, 256):
            plans.append(pick_config(m_hint, K, N, gs, dtype, act_order=act_order, num_sms=num_sms,
                                     capability=capability, kernel="gemm"))
    out: list[Plan] = []
    for p in plans:
        for s in (p.split_k // 2, p.split_k, p.split_k * 2):
            q = Plan(p.kernel, p.config, s, p.per_k)
            if 1 <= s <= MAX_SPLIT_K and q not in out:
                out.append(q)
    return out


def _plan_key(plan_kind: str, M: int, K: int, N: int, gs: int, dtype: torch.dtype, zeros: bool,
              act_order: bool, device: torch.device) -> str:
    m_bucket = triton.next_power_of_2(max(M, 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}|{plan_kind}|M{m_bucket}|K{K}|N{N}|g{gs}|{dtype}|z{int(zeros)}|a{int(act_order)}"


def _load_tune_file(path: str) -> None:
    if path in _TUNE_FILE_LOADED or not os.path.exists(path):
        return
    _TUNE_FILE_LOADED.add(path)
    with open(path) as f:
        for key, d in json.load(f).items():
            _TUNED[key] = Plan(d["kernel"], LaunchConfig(tuple((k, v) for k, v in d["meta"]), d["num_warps"],
                                                        d["num_stages"]), d["split_k"], d["per_k"])


def _save_tune_file(path: str) -> None:
    data = {k: {"kernel": p.kernel, "meta": list(p.config.meta), "num_warps": p.config.num_warps,
                "num_stages": p.config.num_stages, "split_k": p.split_k, "per_k": p.per_k}
            for k, p in _TUNED.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _plan_for(kernel: str | None, x2: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, gs: int,
              g_idx: Tensor | None, bias: Tensor | None) -> Plan:
    """Heuristic plan on the CPU; on a GPU the fastest of a few candidates, measured once per shape.

    The cache key is (GPU, kernel, M rounded up to a power of two, K, N, group, dtype, zeros, act-order),
    as GemLite keys its tuned tables. Set ``TRITONQ_AUTOTUNE=0`` to use the heuristic everywhere and
    ``TRITONQ_TUNE_FILE=path.json`` to persist the table across processes. Tuning never runs while a CUDA
    graph is being captured (the heuristic plan is used and not cached).
    """
    M, K = x2.shape
    N = qweight.shape[1]
    act_order = g_idx is not None
    on_gpu = x2.is_cuda and not _interpreted()
    num_sms = torch.cuda.get_device_properties(x2.device).multi_processor_count if on_gpu else DEFAULT_NUM_SMS
    capability = torch.cuda.get_device_capability(x2.device) if on_gpu else (9, 0)
    base = pick_config(M, K, N, gs, x2.dtype, act_order=act_order, num_sms=num_sms, capability=capability,
                       kernel=kernel)
    if not on_gpu or os.environ.get("TRITONQ_AUTOTUNE", "1") == "0":
        return base
    key = _plan_key(kernel or "auto", M, K, N, gs, x2.dtype, zeros is not None, act_order, x2.device)
    if torch.cuda.is_current_stream_capturing():
        return _TUNED.get(key, base)
    tune_file = os.environ.get("TRITONQ_TUNE_FILE")
    if tune_file:
        _load_tune_file(tune_file)
    if key not in _TUNED:
        from triton.testing import do_bench

        timings = []
        for cand in candidates(base, M, K, N, gs, x2.dtype, act_order, num_sms, capability, kernel is not None):
            def run(c: Plan = cand) -> Tensor:
                return _launch(c, x2, qweight, scales, zeros, gs, g_idx, bias)
            try:
                timings.append((do_bench(run, warmup=5, rep=20), cand))
            except Exception as exc:  # a candidate that fails to compile or launch is skipped, not fatal
                warn(f"dequant_matmul: skipping {cand.config.label()} split {cand.split_k}: {exc}")
        _TUNED[key] = min(timings, key=lambda tc: tc[0])[1] if timings else base
        if tune_file:
            _save_tune_file(tune_file)
    return _TUNED[key]


def dequant_matmul_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, *,
                          group_size: int, g_idx: Tensor | None = None, bias: Tensor | None = None,
                          kernel: str | None = None, plan: Plan | None = None) -> Tensor:
    """Triton launcher with the semantics of :func:`dequant_matmul_ref` (x in fp16/bf16).

    ``kernel`` forces "gemv" or "gemm"; ``plan`` fixes config and split (tests and the bench use it).
    """
    if kernel not in KERNEL_CHOICES:
        raise TritonqError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    gs = _check_args(x, qweight, scales, zeros, group_size, g_idx, bias)
    if _TL_DTYPE[x.dtype] not in LIMITS.dtypes:
        raise TritonqError(f"the Triton kernels take {' or '.join(LIMITS.dtypes)} activations, got {x.dtype}; "
                           "cast x or use force='ref'")
    K = x.shape[-1]
    N = qweight.shape[1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], N))
    qweight = qweight.contiguous()
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    g_idx = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    if plan is None:
        plan = _plan_for(kernel, x2, qweight, scales, zeros, gs, g_idx, bias)
    _check_plan(plan, K, gs, g_idx is not None)
    out = _launch(plan, x2, qweight, scales, zeros, gs, g_idx, bias)
    return out.reshape(*x.shape[:-1], N)


def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, *, group_size: int,
                   g_idx: Tensor | None = None, bias: Tensor | None = None,
                   force: str | None = None, kernel: str | None = None) -> Tensor:
    """``x @ dequantize(qweight, scales, zeros) + bias`` in x's dtype; the dispatch of this op.

    ``force`` (:data:`tritonq.kernels.FORCE`): ``None``: CUDA fp16/bf16 tensors run the Triton kernels,
    anything else the reference; ``"triton"`` or ``"ref"`` pick one path (the kernels also run on CPU
    tensors under ``TRITON_INTERPRET=1``). ``kernel`` (:data:`KERNEL_CHOICES`) picks the Triton kernel:
    ``None`` lets :func:`pick_config` choose (GEMV for at most ``GEMV_MAX_M`` rows, GEMM above),
    ``"gemv"`` or ``"gemm"`` force one; it is checked on every path.
    """
    check_force(force)
    if kernel not in KERNEL_CHOICES:
        raise TritonqError(f"kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if force == "ref" or (force is None and (not x.is_cuda or _TL_DTYPE.get(x.dtype) not in LIMITS.dtypes)):
        return dequant_matmul_ref(x, qweight, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias)
    return dequant_matmul_triton(x, qweight, scales, zeros, group_size=group_size, g_idx=g_idx, bias=bias,
                                 kernel=kernel)
