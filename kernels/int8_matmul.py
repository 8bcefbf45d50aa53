"""W8A8: per-token dynamic int8 quantization of the activations, then an int8 x int8 -> int32 GEMM with the
per-token and per-channel scales applied in the epilogue. PyTorch references beside the Triton kernels.

``y[m, n] = a_scale[m] * w_scale[n] * sum_k xq[m, k] * wq[n, k] + bias[n]`` with
``a_scale[m] = max(max_k |x[m, k]|, 127e-5) / 127`` and ``xq = clamp(round_half_even(x / a_scale), -128, 127)``
(SmoothQuant's per-token scheme, Xiao et al. 2023 §4; the engine's ``act_quant`` per-token symmetric grid).

The GEMM accumulates in int32 through ``tl.dot(..., out_dtype=tl.int32)``, which lowers to the int8 tensor
core instructions: IMMA on sm_80/86/89, IGMMA (wgmma) on sm_90, UTCIMMA (tcgen05) on sm_100, MFMA i8 on
gfx90a/gfx942 (counted in the "mma" column of ``tritonq bench static``); on sm_75 Triton has no int8 MMA and
the kernel does not compile, so the dispatcher uses the reference there (:func:`excluded`). K tails are masked
to zero, which is exact.

The reference computes the integer product exactly in floating point: fp32 holds every partial sum while
``K * 128 * 128 < 2^24``, fp64 beyond (products of int8 codes are at most 2^14).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelLimits, LaunchConfig
from .grid_rule import MIN_ACT_SCALE

QMAX = 127

GEMM_CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
    LaunchConfig.of(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),  # 4 warps spill on sm_8x
)
QUANT_CONFIGS: tuple[LaunchConfig, ...] = (LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_K=1024),)
LIMITS = KernelLimits(dtypes=("fp16", "bf16", "fp32"))


# ----------------------------------------------------------------------------------------------------
# references


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: int8 codes [M, K] and fp32 scales [M] of the rows of ``x`` [M, K]."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / QMAX).clamp(min=MIN_ACT_SCALE)
    codes = torch.clamp(torch.round(xf / scale[:, None]), -QMAX - 1, QMAX).to(torch.int8)
    return codes, scale


def int8_matmul_ref(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Reference: ``(xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias``; ``xq`` [M, K], ``wq`` [N, K]."""
    k = xq.shape[1]
    exact = torch.float32 if k * 128 * 128 < 2**24 else torch.float64
    acc = (xq.to(exact) @ wq.to(exact).t()).float()
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w8a8_linear_ref(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the whole W8A8 linear on ``x`` [..., K]: quantize per token, int8 GEMM, scales, bias."""
    lead = x.shape[:-1]
    xq, xs = quantize_per_token_ref(x.reshape(-1, x.shape[-1]))
    return int8_matmul_ref(xq, wq, xs, w_scale, bias, x.dtype).reshape(*lead, wq.shape[0])


# ----------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, min_scale, BLOCK_K: tl.constexpr):
    """Program m: the absmax of row m, then its int8 codes (two passes over the row, BLOCK_K at a time)."""
    m = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 127.0, min_scale)
    tl.store(s_ptr + m, scale)
    for k0 in range(0, K, BLOCK_K):
        ok = k0 + cols < K
        x = tl.load(x_ptr + m * stride_x + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        v = tl.math.div_rn(x, scale)
        r = (v + 12582912.0) - 12582912.0  # round to nearest, ties to even (|v| <= 127)
        r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        tl.store(q_ptr + m * stride_q + k0 + cols, r.to(tl.int8), mask=ok)


@triton.jit
def int8_gemm_kernel(
    a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m tile, n tile): int32 accumulation of A [M, K] @ B[N, K]^T, then scales and bias."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                    other=0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                    other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    a_s = tl.load(as_ptr + rm, mask=rm < M, other=0.0)
    b_s = tl.load(bs_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=ok)


NO_INT8_DOT = ("sm_75",)  # Triton 3.9's matmul lowering has no int8 MMA for Turing: compilation fails


def excluded(target: str, dtype: str, config: LaunchConfig) -> str | None:
    """Why the launcher never runs the int8 GEMM on ``target`` (None: it may)."""
    if target in NO_INT8_DOT:
        return ("Triton has no int8 tensor-core dot on sm_75 (TritonGPUAccelerateMatmul fails); the W8A8 linear "
                "runs the PyTorch reference there")
    return None


def kernel_usable(x: torch.Tensor) -> bool:
    """False where :func:`excluded` rules out the int8 GEMM for ``x``'s device (the interpreter: True)."""
    if not x.is_cuda:
        return True
    from .aot.catalog import device_target

    target = device_target(x.device)
    return target is None or excluded(target, "fp16", pick_gemm_config(1)) is None


def pick_gemm_config(m: int) -> LaunchConfig:
    """64 x 64 tiles for decode and small batches, 128 x 128 for prefill (M >= 256)."""
    return GEMM_CONFIGS[1] if m >= 256 else GEMM_CONFIGS[0]


def pick_quant_config() -> LaunchConfig:
    return QUANT_CONFIGS[0]


def aot_signature_gemm(dtype: str, config: LaunchConfig, HAS_BIAS: bool = False) -> tuple[dict, dict]:
    """Argument types of :func:`int8_gemm_kernel` (``dtype``: the output's)."""
    sig = {"a_ptr": "*i8", "b_ptr": "*i8", "as_ptr": "*fp32", "bs_ptr": "*fp32", "bias_ptr": f"*{dtype}",
           "c_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32", "stride_am": "i32", "stride_bn": "i32",
           "stride_cm": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    return sig, {**config.constexprs(), "HAS_BIAS": HAS_BIAS}


def aot_signature_quant(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """Argument types of :func:`quantize_per_token_kernel` (``dtype``: the activations')."""
    sig = {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_x": "i32", "stride_q": "i32",
           "min_scale": "fp32", "BLOCK_K": "constexpr"}
    return sig, config.constexprs()


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher with the semantics of :func:`quantize_per_token_ref` (``x`` [M, K])."""
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        x = x.float()  # the interpreter has no bf16 loads; values are unchanged
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    config = pick_quant_config()
    quantize_per_token_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), MIN_ACT_SCALE, num_warps=config.num_warps,
                                    num_stages=config.num_stages, **config.constexprs())
    return q, s


def int8_matmul_triton(xq: torch.Tensor, wq: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Triton launcher with the semantics of :func:`int8_matmul_ref`."""
    xq, wq = xq.contiguous(), wq.contiguous()
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    config = pick_gemm_config(m)
    meta = config.constexprs()
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
    b = bias.to(out_dtype).contiguous() if bias is not None else out  # any pointer when HAS_BIAS is off
    int8_gemm_kernel[grid](xq, wq, x_scale.float().contiguous(), w_scale.float().contiguous(), b, out, m, n, k,
                           xq.stride(0), wq.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                           num_warps=config.num_warps, num_stages=config.num_stages, **meta)
    return out


def w8a8_linear_triton(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused per-token quantization kernel, then the int8 GEMM (semantics of :func:`w8a8_linear_ref`)."""
    lead = x.shape[:-1]
    xq, xs = quantize_per_token_triton(x.reshape(-1, x.shape[-1]))
    return int8_matmul_triton(xq, wq, xs, w_scale, bias, x.dtype).reshape(*lead, wq.shape[0])
