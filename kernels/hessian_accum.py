"""Hessian accumulation ``H <- n/(n+m) * H + 2/(n+m) * X^T X``: the PyTorch reference and the Triton kernel.

GPTQ's layer objective ``||W X - Q X||^2`` has the Hessian ``H = 2 X X^T`` averaged over calibration
tokens (Frantar et al., GPTQ, arXiv:2210.17323, §3; ``add_batch`` of the reference code keeps a running
mean). ``X`` comes in the model's dtype; each product of two 16-bit numbers is exact in fp32, so the
kernel feeds fp16/bf16 straight into ``tl.dot`` with fp32 accumulation and applies the ``2/n`` scaling to
the fp32 result (``../shared/docs/kernels_perf.md`` §3). fp32 inputs use IEEE fp32 products (no TF32)
so that results match the fp32 reference.

H is symmetric: the kernel computes only the tiles on and above the diagonal (one program per tile
pair ``bi <= bj``) and writes each off-diagonal tile twice, as itself and mirrored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelLimits, LaunchConfig

# BLOCK_H: Hessian tile edge; BLOCK_T: tokens per step of the reduction.
CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_H=32, BLOCK_T=32),
    # 2 stages: with 3 the fp16 tile spills on sm_86/sm_89 (AOT report)
    LaunchConfig.of(num_warps=4, num_stages=2, BLOCK_H=64, BLOCK_T=32),
)


REF_TILE = 256  # widest diagonal tile of the reference's upper-triangle products (192-288 measured best)


def hessian_accumulate_ref(hessian: torch.Tensor, x: torch.Tensor, n_seen: int) -> int:
    """Reference: fold a batch ``x`` [T, K] into the running-mean ``hessian`` [K, K] (fp32, in place).

    Returns the new number of tokens seen. Like the kernel, it forms only the tiles on and above the
    diagonal (``n (n + 1) / 2`` of the ``n^2`` tile products, about 60% of the work for ``n = 6``: this
    is the engine's CPU path, where the products are most of a calibration pass) and mirrors them.
    """
    m, k = x.shape
    n_new = n_seen + m
    xf = x.float()
    n_tiles = -(-k // REF_TILE)
    edges = [round(i * k / n_tiles) for i in range(n_tiles + 1)]
    keep, add = n_seen / n_new, 2.0 / n_new
    for i0, i1 in zip(edges, edges[1:]):
        # one GEMM per tile row: the diagonal tile and everything right of it
        hessian[i0:i1, i0:].addmm_(xf[:, i0:i1].t(), xf[:, i0:], beta=keep, alpha=add)
        hessian[i1:, i0:i1] = hessian[i0:i1, i1:].t()
    return n_new


@triton.jit
def hessian_accum_kernel(
    x_ptr, h_ptr, pairs_ptr, T, K, stride_xt, stride_h, alpha, beta,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, FP32_INPUT: tl.constexpr, UPCAST: tl.constexpr = False,
):
    """One program: tile (bi, bj), bi <= bj, of H = alpha * H + beta * X[:, bi]^T X[:, bj]."""
    pid = tl.program_id(0)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    rows = bi * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = bj * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_H, BLOCK_H), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        tt = t0 + t
        a = tl.load(x_ptr + tt[:, None] * stride_xt + rows[None, :],
                    mask=(tt[:, None] < T) & (rows[None, :] < K), other=0.0)
        b = tl.load(x_ptr + tt[:, None] * stride_xt + cols[None, :],
                    mask=(tt[:, None] < T) & (cols[None, :] < K), other=0.0)
        if UPCAST:  # the interpreter has no bf16 dot; bf16 products are exact in fp32 anyway
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc, input_precision="ieee")
        elif FP32_INPUT:
            acc = tl.dot(tl.trans(a), b, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(a), b, acc)
    mask = (rows[:, None] < K) & (cols[None, :] < K)
    offs = rows[:, None] * stride_h + cols[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    h = alpha * h + beta * acc
    tl.store(h_ptr + offs, h, mask=mask)
    if bi != bj:
        offs_t = cols[None, :] * stride_h + rows[:, None]
        tl.store(h_ptr + offs_t, h, mask=mask)


def pick_config(k: int) -> LaunchConfig:
    """Small inputs get 32-wide tiles (more programs); wide ones 64-wide tiles (more reuse per load)."""
    return CONFIGS[0] if k < 1024 else CONFIGS[1]


_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Inputs of any other dtype are cast to fp32 by the launcher; any width K is tiled.
LIMITS = KernelLimits(dtypes=("fp16", "bf16", "fp32"))


def aot_signature(dtype: str, config: LaunchConfig) -> tuple[dict, dict]:
    """Argument types for ahead-of-time compilation of :func:`hessian_accum_kernel`."""
    signature = {
        "x_ptr": f"*{dtype}", "h_ptr": "*fp32", "pairs_ptr": "*i32", "T": "i32", "K": "i32",
        "stride_xt": "i32", "stride_h": "i32", "alpha": "fp32", "beta": "fp32",
        "BLOCK_H": "constexpr", "BLOCK_T": "constexpr", "FP32_INPUT": "constexpr",
    }
    constexprs = {**config.constexprs(), "FP32_INPUT": dtype == "fp32", "UPCAST": False}
    return signature, constexprs


def excluded(target: str, dtype: str, config: LaunchConfig) -> str | None:
    """Why the launcher never runs ``config`` for ``dtype`` on ``target`` (None: it may)."""
    if target == "sm_75" and dtype in ("fp16", "bf16"):
        return ("Triton emits no tensor-core dot on sm_75 (FMA fallback, and the 64-wide tile spills); "
                "the dispatcher uses the cuBLAS reference there")
    return None


def kernel_usable(x: torch.Tensor) -> bool:
    """False where :func:`excluded` rules out the launch for ``x``'s device and dtype."""
    if not x.is_cuda:
        return True  # the interpreter
    from .aot.catalog import device_target

    target = device_target(x.device)
    dtype = _TORCH_TO_TRITON.get(x.dtype, "fp32")
    return target is None or excluded(target, dtype, pick_config(x.shape[-1])) is None


_PAIRS_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _tile_pairs(n_tiles: int, device: torch.device) -> torch.Tensor:
    key = (n_tiles, str(device))
    if key not in _PAIRS_CACHE:
        idx = torch.triu_indices(n_tiles, n_tiles)
        _PAIRS_CACHE[key] = idx.t().contiguous().to(device=device, dtype=torch.int32)
    return _PAIRS_CACHE[key]


def hessian_accumulate_triton(hessian: torch.Tensor, x: torch.Tensor, n_seen: int) -> int:
    """Triton launcher with the semantics of :func:`hessian_accumulate_ref`."""
    t, k = x.shape
    if _TORCH_TO_TRITON.get(x.dtype) not in LIMITS.dtypes:
        x = x.float()
    x = x.contiguous()
    n_new = n_seen + t
    config = pick_config(k)
    block = config.constexprs()["BLOCK_H"]
    pairs = _tile_pairs(triton.cdiv(k, block), x.device)
    hessian_accum_kernel[(pairs.shape[0],)](
        x, hessian, pairs, t, k, x.stride(0), hessian.stride(0), n_seen / n_new, 2.0 / n_new,
        FP32_INPUT=x.dtype == torch.float32, UPCAST=x.dtype == torch.bfloat16 and not x.is_cuda,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **config.constexprs(),
    )
    return n_new
