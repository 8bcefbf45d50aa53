"""Fast Walsh-Hadamard transform of rows: the PyTorch reference and the Triton kernel (issue 24 item 2, the online
Hadamard of QuaRot, Ashkboos et al. 2024, arXiv:2404.00456, applied to activations at run time).

``y = x H^T / sqrt(n)`` for every row ``x`` [n] with ``H = B (x) S_p``: ``S_p`` the Sylvester Hadamard matrix of
the power of two ``p`` and ``B`` an optional ``m x m`` +-1 base matrix (``n = m p``; e.g. Paley's order 12 or 36,
built by ``engine/orthogonal.py``; this module takes it as a tensor, as kernels import nothing from the engine).
Viewing a row as ``X`` [m, p] (row-major), ``H x = vec(B X S_p)``: the kernel runs the ``log2 p`` butterfly stages
of ``X S_p`` (``a, b -> a + b, a - b`` at strides 1, 2, 4, ...; Sylvester is symmetric, so this is ``S_p x`` in
natural order), all in fp32 registers, and the launcher applies ``B`` as a small matmul over the ``m`` rows. The
reference runs the same butterflies in the same order, so the kernel matches it bit for bit in fp32 (the scale
``1 / sqrt(n)`` is one multiply at the end of both). The CPU runs the reference (``kernels.hadamard_transform``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import TritonqError
from .configs import KernelLimits, LaunchConfig

MAX_P = 1 << 15  # widest power-of-two part one program holds in registers (rows of BLOCK_M x P fp32)
# BLOCK_M rows per program: about 4096 fp32 values in flight, so wide rows get one row each
CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_M=16),
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_M=4),
    LaunchConfig.of(num_warps=8, num_stages=1, BLOCK_M=1),
)
LIMITS = KernelLimits(dtypes=("fp16", "bf16", "fp32"), max_cols=MAX_P)
_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def power_of_two_part(n: int, base: torch.Tensor | None) -> int:
    """``p = n / m`` for a base of order ``m`` (1 without one); a :class:`TritonqError` where it is no power of two,
    or the base is not a square +-1 matrix whose order divides ``n``."""
    m = 1
    if base is not None:
        if base.dim() != 2 or base.shape[0] != base.shape[1]:
            raise TritonqError(f"the Hadamard base must be a square matrix, got shape {tuple(base.shape)}")
        m = base.shape[0]
    if n < 1 or n % m or (n // m) & (n // m - 1):
        raise TritonqError(f"a Hadamard transform of width {n} needs n = m * 2^k with the base's order m = {m}; "
                           "pass a base matrix whose order takes out the odd part")
    return n // m


def fwht_ref(x: torch.Tensor) -> torch.Tensor:
    """``x S_p`` for rows ``x`` [M, p] (p a power of two), unscaled, in fp32 (float64 stays float64, for exactness
    tests): the kernel's butterflies in its order."""
    m, p = x.shape
    y = x if x.dtype == torch.float64 else x.float()
    h = 1
    while h < p:
        y = y.reshape(m, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).reshape(m, p)
        h *= 2
    return y


def _apply_base(y: torch.Tensor, base: torch.Tensor | None, n: int) -> torch.Tensor:
    """``B X`` for each row viewed as ``X`` [m, p] (in ``y``'s dtype: fp32, or float64), then the scale
    ``1 / sqrt(n)``."""
    if base is not None and base.shape[0] > 1:
        m = base.shape[0]
        y = torch.matmul(base.to(device=y.device, dtype=y.dtype), y.reshape(-1, m, n // m)).reshape(-1, n)
    return y * (1.0 / math.sqrt(n))


def hadamard_transform_ref(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``x H^T / sqrt(n)`` along the last dimension, ``H = base (x) Sylvester(p)``, computed in fp32
    (float64 for float64 ``x``); ``x``'s dtype out."""
    n = x.shape[-1]
    p = power_of_two_part(n, base)
    rows = x.reshape(-1, n)
    y = fwht_ref(rows.reshape(-1, p))
    return _apply_base(y.reshape(-1, n), base, n).to(x.dtype).reshape(x.shape)


@triton.jit
def fwht_kernel(x_ptr, y_ptr, M, stride_x, stride_y, P: tl.constexpr, LOG_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """One program: BLOCK_M rows of P values, ``log2 P`` butterfly stages in fp32 registers, fp32 out (unscaled)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, P)
    mask = rows[:, None] < M
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(LOG_P):
        # stage s pairs the elements 2^s apart: [.., 2, h] with the pair axis moved last, then split and joined
        x = tl.permute(tl.reshape(x, (BLOCK_M, P // (2 << s), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(x)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (BLOCK_M, P))
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], x, mask=mask)


def pick_config(p: int) -> LaunchConfig:
    """Rows per program so that about 4096 fp32 values are in flight (wide rows: one each, more warps)."""
    if p <= 256:
        return CONFIGS[0]
    return CONFIGS[1] if p <= 1024 else CONFIGS[2]


def aot_signature(dtype: str, config: LaunchConfig, P: int = 4096) -> tuple[dict, dict]:  # noqa: N803 (the constexpr)
    """Argument types for ahead-of-time compilation of :func:`fwht_kernel` (width ``P``, a variant)."""
    signature = {"x_ptr": f"*{dtype}", "y_ptr": "*fp32", "M": "i32", "stride_x": "i32", "stride_y": "i32",
                 "P": "constexpr", "LOG_P": "constexpr", "BLOCK_M": "constexpr"}
    return signature, {**config.constexprs(), "P": P, "LOG_P": P.bit_length() - 1}


def hadamard_transform_triton(x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Triton launcher with the semantics of :func:`hadamard_transform_ref`."""
    n = x.shape[-1]
    p = power_of_two_part(n, base)
    if p > MAX_P:
        raise TritonqError(f"the hadamard kernel holds rows of up to {MAX_P} values in registers, got a power-of-two "
                           f"part of {p}; use force='ref' or a base matrix that takes a larger factor out")
    rows = x.reshape(-1, p)
    if _TORCH_TO_TRITON.get(rows.dtype) is None:
        rows = rows.float()
    rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    config = pick_config(p)
    block = config.constexprs()["BLOCK_M"]
    if rows.shape[0]:
        fwht_kernel[(triton.cdiv(rows.shape[0], block),)](
            rows, y, rows.shape[0], rows.stride(0), y.stride(0), P=p, LOG_P=p.bit_length() - 1,
            num_warps=config.num_warps, num_stages=config.num_stages, **config.constexprs())
    return _apply_base(y.reshape(-1, n), base, n).to(x.dtype).reshape(x.shape)
