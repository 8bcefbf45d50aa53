"""Fake quantization with learned rounding offsets and grid factors (AutoRound's hot path), differentiable.

AutoRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs",
arXiv:2309.05516; intel/auto-round ``data_type/int.py``, ``quant_tensor_asym`` / ``quant_tensor_sym``) learns,
per weight, an offset ``V`` added before rounding and, per group, factors on the group's range:

    lo = min(w_g, 0) * min_factor        hi = max(w_g, 0) * max_factor
    scale = (hi - lo) / maxq             zero = clamp(round(-lo / scale), 0, maxq)        (asymmetric)
    scale = 2 * max(-lo, hi) / maxq      zero = (maxq + 1) / 2                            (symmetric)
    q = clamp(round(w / scale + V) + zero, 0, maxq)          out = scale * (q - zero)

``round`` is a straight-through estimator (identity gradient), and the scale is rounded to fp16 (as tritonq's
grid rule, ``grid_rule.minmax_scale_zero``, and auto-round's fp16 ``scale_dtype`` do) with an identity gradient.
With ``V = 0`` and both factors 1 the output is, bit for bit, the min-max grid's ``fake_quantize`` (RTN): every
fp32 operation is the grid rule's, in its order.

Differences from auto-round: the symmetric grid is tritonq's (unsigned codes around ``zero = 2^(b-1)``,
``scale = 2 absmax / maxq``), not auto-round's signed ``[-2^(b-1), 2^(b-1) - 1]`` codes with ``scale = absmax /
2^(b-1)``; the zero is clamped to ``[0, maxq]`` (a no-op while the factors stay in [0, 1], which the optimiser
enforces, as auto-round clamps them).

This module holds the PyTorch reference (:func:`signround_qdq_ref`, autograd through the formula above) and the
Triton path (``kernels.signround_qdq`` dispatches): a forward kernel, bit-identical to the reference for factors
>= 0, and a backward kernel that recomputes the forward and returns the straight-through gradients of the offsets
and both factors, reduced per group in the kernel (:class:`SignRoundQDQ`). ``tests/test_signround_kernel.py``
checks both against the reference, the gradients against its float64 autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelLimits, LaunchConfig
from .grid_fit import minmax_fit, round_half_even
from .grid_rule import MIN_SCALE


class _RoundSTE(torch.autograd.Function):
    """``round`` (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


class _Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (kept in fp32) forward, identity backward (no fp16 rounding of the gradient,
    which a plain ``.to(float16)`` in autograd would apply)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def signround_grid(w_lo: torch.Tensor, w_hi: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                   maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` per group from the group's range ``w_lo = min(w_g)``, ``w_hi = max(w_g)`` and the factors
    (all ``[N, G]`` fp32); differentiable in the factors. Factors of 1 give ``minmax_scale_zero`` bit for bit."""
    lo = torch.clamp(w_lo, max=0.0) * min_factor
    hi = torch.clamp(w_hi, min=0.0) * max_factor
    scale = 2.0 * torch.maximum(-lo, hi) / maxq if sym else (hi - lo) / maxq
    scale = _Fp16STE.apply(torch.clamp(scale, min=MIN_SCALE))
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(_RoundSTE.apply(-lo / scale), 0, maxq)
    return scale, zero


def signround_qdq_ref(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                      group: int, maxq: int, sym: bool) -> torch.Tensor:
    """Quantize -> dequantize ``w`` (fp32 ``[N, K]``, constant) with rounding ``offsets`` ``[N, K]`` and grid factors
    ``[N, K // group]``; differentiable in ``offsets`` and both factors (straight-through rounding). ``group`` is the
    group width (``K`` for one group per row)."""
    n, k = w.shape
    grouped = w.view(n, k // group, group)
    w_lo, w_hi = torch.aminmax(grouped, dim=2)
    scale, zero = signround_grid(w_lo, w_hi, min_factor, max_factor, maxq, sym)
    s, z = scale[..., None], zero[..., None]
    q = torch.clamp(_RoundSTE.apply(grouped / s + offsets.view(n, k // group, group)) + z, 0, maxq)
    return ((q - z) * s).view(n, k)


# ----------------------------------------------------------------------------------------------------------
# The Triton path: a forward kernel (bit-identical to the reference) and a straight-through backward kernel.
#
# Layout: one program per (group, tile of BLOCK_N rows); the group is walked in chunks of BLOCK_K columns, twice:
# once for its range, once to quantize (the forward) or to write grad_offsets and reduce the factors' gradients
# (the backward). A group that fits one chunk (32/64/128) is read twice from the same cache lines; a wide group
# (per channel, K up to ~14336) never has to fit in registers.
#
# The grid fit is grid_fit.minmax_fit on the factored range: it clamps lo <= 0 <= hi again, a no-op for factors
# >= 0 (the optimiser keeps them in [0, 1]), so kernel and reference agree bit for bit on that domain; for a
# negative factor the reference leaves the range uncentred and the kernel does not. The clamps also keep the
# products lo * min_factor, hi * max_factor out of reach of fma contraction (fp fusion stays on).
#
# Backward (straight-through, as the reference's autograd): with t = round(w / s + V) + z, the code
# q = clamp(t, 0, maxq) and m = 0 <= t <= maxq (torch.clamp passes the gradient on its bounds):
#   dV = m g s                                   (the reference's autograd product, bit for bit)
#   ds = sum(g (q - z) - dV (w / s) / s)         (dequantization, and w / s inside the round)
#   dz = -s sum((1 - m) g)                       (asym; the two uses of z cancel where the code is not clipped)
#   asym: x = -lo / s, z = clamp(round(x)): ds += -dz' x / s and dlo = -dz' / s with dz' = dz where 0 <= round(x)
#   <= maxq; then s = fp16(max(raw, MIN_SCALE)) passes ds where raw >= MIN_SCALE, raw = (hi - lo) / maxq
#   (asym) or 2 max(-lo, hi) / maxq (sym, a tie splits the gradient in half as torch.maximum does);
#   dmin_factor = dlo min(w_lo, 0), dmax_factor = dhi max(w_hi, 0).


# compiled into the two kernels below, never launched: no catalog entry (kernels/aot/catalog.py:discover_kernels)
DEVICE_HELPERS = ("_group_range", "_factored_grid", "_unclipped_codes")


@triton.jit
def _group_range(w_row, row_ok, group, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Min and max of each row's group (``group`` columns from the pointers ``w_row`` [BLOCK_N, 1])."""
    w_lo = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    w_hi = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    for k0 in range(0, group, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < group)[None, :]
        w = tl.load(w_row + cols[None, :], mask=ok, other=0.0)
        w_lo = tl.minimum(w_lo, tl.min(tl.where(ok, w, float("inf")), axis=1))
        w_hi = tl.maximum(w_hi, tl.max(tl.where(ok, w, float("-inf")), axis=1))
    return w_lo, w_hi


@triton.jit
def _factored_grid(w_lo, w_hi, mf, xf, maxq, min_scale, SYM: tl.constexpr):
    """:func:`signround_grid`: ``(lo, hi, scale, zero)`` per row, the grid rule of ``grid_fit.minmax_fit``."""
    lo = tl.minimum(w_lo, 0.0) * mf
    hi = tl.maximum(w_hi, 0.0) * xf
    scale, zero = minmax_fit(lo, hi, maxq, min_scale, SYM)
    return lo, hi, scale, zero


@triton.jit
def _unclipped_codes(w, v, scale, zero):
    """``(w / scale, round(w / scale + v) + zero)``, the reference's fp32 operations in its order."""
    ws = tl.math.div_rn(w, scale[:, None])
    return ws, round_half_even(ws + v) + zero[:, None]


@triton.jit
def signround_fwd_kernel(w_ptr, v_ptr, mf_ptr, xf_ptr, out_ptr, N, G, group, stride, maxq, min_scale,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SYM: tl.constexpr):
    """Program (group, rows tile): ``out = scale * (clamp(round(w / scale + V) + zero, 0, maxq) - zero)``."""
    grp = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs = rows[:, None] * stride + grp * group  # w, V and out share the contiguous [N, K] layout
    mf = tl.load(mf_ptr + rows * G + grp, mask=row_ok, other=1.0)
    xf = tl.load(xf_ptr + rows * G + grp, mask=row_ok, other=1.0)
    w_lo, w_hi = _group_range(w_ptr + offs, row_ok, group, BLOCK_N, BLOCK_K)
    _lo, _hi, scale, zero = _factored_grid(w_lo, w_hi, mf, xf, maxq, min_scale, SYM)
    qmax = maxq.to(tl.float32)
    for k0 in range(0, group, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < group)[None, :]
        w = tl.load(w_ptr + offs + cols[None, :], mask=ok, other=0.0)
        v = tl.load(v_ptr + offs + cols[None, :], mask=ok, other=0.0)
        _ws, t = _unclipped_codes(w, v, scale, zero)
        q = tl.minimum(tl.maximum(t, 0.0), qmax)
        tl.store(out_ptr + offs + cols[None, :], (q - zero[:, None]) * scale[:, None], mask=ok)


@triton.jit
def signround_bwd_kernel(w_ptr, v_ptr, mf_ptr, xf_ptr, g_ptr, gv_ptr, gmf_ptr, gxf_ptr, N, G, group, stride, maxq,
                         min_scale, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SYM: tl.constexpr):
    """Program (group, rows tile): the forward's quantities again, ``grad_offsets`` per weight and the factors'
    gradients reduced over the group (the derivation above)."""
    grp = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs = rows[:, None] * stride + grp * group
    mf = tl.load(mf_ptr + rows * G + grp, mask=row_ok, other=1.0)
    xf = tl.load(xf_ptr + rows * G + grp, mask=row_ok, other=1.0)
    w_lo, w_hi = _group_range(w_ptr + offs, row_ok, group, BLOCK_N, BLOCK_K)
    lo, hi, scale, zero = _factored_grid(w_lo, w_hi, mf, xf, maxq, min_scale, SYM)
    qmax = maxq.to(tl.float32)
    grad_scale = tl.zeros((BLOCK_N,), dtype=tl.float32)
    clipped = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum of grad_out over the clipped codes
    for k0 in range(0, group, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < group)[None, :]
        w = tl.load(w_ptr + offs + cols[None, :], mask=ok, other=0.0)
        v = tl.load(v_ptr + offs + cols[None, :], mask=ok, other=0.0)
        g = tl.load(g_ptr + offs + cols[None, :], mask=ok, other=0.0)
        ws, t = _unclipped_codes(w, v, scale, zero)
        inside = (t >= 0.0) & (t <= qmax)
        q = tl.minimum(tl.maximum(t, 0.0), qmax)
        gv = tl.where(inside, g * scale[:, None], 0.0)
        tl.store(gv_ptr + offs + cols[None, :], gv, mask=ok)
        grad_scale += tl.sum(g * (q - zero[:, None]) - gv * tl.math.div_rn(ws, scale[:, None]), axis=1)
        clipped += tl.sum(tl.where(inside, 0.0, g), axis=1)
    grad_lo = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if not SYM:  # zero = clamp(round(-lo / scale), 0, maxq)
        x = -tl.math.div_rn(lo, scale)
        zr = round_half_even(x)
        grad_x = tl.where((zr >= 0.0) & (zr <= qmax), -scale * clipped, 0.0)
        grad_scale -= grad_x * tl.math.div_rn(x, scale)
        grad_lo -= tl.math.div_rn(grad_x, scale)
    lo_c = tl.minimum(lo, 0.0)  # minmax_fit's range (lo, hi themselves for factors >= 0)
    hi_c = tl.maximum(hi, 0.0)
    if SYM:
        raw = tl.math.div_rn(2.0 * tl.maximum(-lo_c, hi_c), qmax)
    else:
        raw = tl.math.div_rn(hi_c - lo_c, qmax)
    # raw = span / maxq (span = hi - lo, or 2 max(-lo, hi)); the MIN_SCALE clamp passes where raw >= MIN_SCALE
    grad_span = tl.where(raw >= min_scale, tl.math.div_rn(grad_scale, qmax), 0.0)
    if SYM:
        grad_m = 2.0 * grad_span
        tie = -lo_c == hi_c
        grad_hi = tl.where(tie, 0.5 * grad_m, tl.where(hi_c > -lo_c, grad_m, 0.0))
        grad_lo -= tl.where(tie, 0.5 * grad_m, tl.where(-lo_c > hi_c, grad_m, 0.0))
    else:
        grad_hi = grad_span
        grad_lo -= grad_span
    tl.store(gmf_ptr + rows * G + grp, grad_lo * tl.minimum(w_lo, 0.0), mask=row_ok)
    tl.store(gxf_ptr + rows * G + grp, grad_hi * tl.maximum(w_hi, 0.0), mask=row_ok)


# one config per group width: the whole group in one chunk up to 256 columns, ~2K elements per program (16 per
# thread at 4 warps); wider groups (per channel) are walked in 512-column chunks of 4 rows
CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=32, BLOCK_K=32),
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=16, BLOCK_K=64),
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=16, BLOCK_K=128),
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=8, BLOCK_K=256),
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=4, BLOCK_K=512),
)
# fp32 weights, offsets and factors; any group dividing K (the chunks are masked), bits 1 to 8
LIMITS = KernelLimits(dtypes=("fp32",))
MAX_MAXQ = 255


def pick_config(group: int) -> LaunchConfig:
    """The narrowest config whose chunk holds the whole group; the 512-column chunks beyond 256."""
    return next((c for c in CONFIGS if c.constexprs()["BLOCK_K"] >= group), CONFIGS[-1])


def check_args(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
               group: int, maxq: int) -> int:
    """The group width (``-1`` -> ``K``) after checking every argument of ``signround_qdq`` (both paths); raises
    :class:`tritonq.errors.TritonqError` with one line naming the problem and the fix."""
    from ..errors import TritonqError

    if w.dim() != 2 or w.numel() == 0:
        raise TritonqError(f"signround_qdq takes a non-empty 2-D weight [N, K], got shape {tuple(w.shape)}; pass "
                           "the linear's weight as [out_features, in_features]")
    n, k = w.shape
    width = k if group == -1 else group
    if isinstance(group, bool) or not isinstance(group, int) or width < 1 or k % width:
        raise TritonqError(f"signround_qdq needs a group that is -1 (one per row) or a positive divisor of K={k}, "
                           f"got {group!r}; choose a --group-size that divides the input width")
    if isinstance(maxq, bool) or not isinstance(maxq, int) or not 1 <= maxq <= MAX_MAXQ:
        raise TritonqError(f"signround_qdq takes maxq = 2^bits - 1 for 1 to 8 bits (1..{MAX_MAXQ}), got {maxq!r}; "
                           "pass GridSpec.maxq")
    expected = {"offsets": (n, k), "min_factor": (n, k // width), "max_factor": (n, k // width)}
    for name, t in (("w", w), ("offsets", offsets), ("min_factor", min_factor), ("max_factor", max_factor)):
        if t.dtype != torch.float32:
            raise TritonqError(f"signround_qdq takes fp32 tensors, got {name} in {t.dtype}; convert it with .float()")
        if name in expected and tuple(t.shape) != expected[name]:
            raise TritonqError(f"signround_qdq expects {name} of shape {expected[name]} for w {tuple(w.shape)} and "
                               f"group {width}, got {tuple(t.shape)}")
        if t.device != w.device:
            raise TritonqError(f"signround_qdq takes all tensors on one device, got w on {w.device} and {name} on "
                               f"{t.device}; move them together")
    return width


def _launch_args(w: torch.Tensor, group: int) -> tuple[tuple[int, int], dict]:
    """Grid (groups, row tiles) and launch keywords for ``w`` [N, K] (contiguous) with groups of ``group``."""
    n, k = w.shape
    if n * k > 2**31 - 1:
        from ..errors import TritonqError

        raise TritonqError(f"the signround kernels index with int32 and take at most 2^31 - 1 weights, got {n} x {k}; "
                           "quantize this layer with the reference (force='ref') or split its rows")
    config = pick_config(group)
    meta = config.constexprs()
    grid = (k // group, triton.cdiv(n, meta["BLOCK_N"]))
    if grid[1] > 65535:  # CUDA's limit on the grid's second axis
        from ..errors import TritonqError

        raise TritonqError(f"the signround kernels take at most {65535 * meta['BLOCK_N']} rows at group {group}, got "
                           f"{n}; quantize this layer with the reference (force='ref') or split its rows")
    return grid, {"num_warps": config.num_warps, "num_stages": config.num_stages, **meta}


def signround_qdq_triton(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor, max_factor: torch.Tensor,
                         group: int, maxq: int, sym: bool) -> torch.Tensor:
    """The forward kernel (no autograd): :func:`signround_qdq_ref`'s output bit for bit (factors >= 0); one launch."""
    w, v, mf, xf = (t.contiguous() for t in (w, offsets, min_factor, max_factor))
    out = torch.empty_like(w)
    grid, meta = _launch_args(w, group)
    n, k = w.shape
    signround_fwd_kernel[grid](w, v, mf, xf, out, n, k // group, group, k, maxq, MIN_SCALE, SYM=sym, **meta)
    return out


def signround_grads_triton(w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor,
                           max_factor: torch.Tensor, grad_out: torch.Tensor, group: int, maxq: int, sym: bool,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel: ``(grad_offsets [N, K], grad_min_factor [N, G], grad_max_factor [N, G])`` for
    ``grad_out`` [N, K], the straight-through gradients of :func:`signround_qdq_ref`; one launch."""
    w, v, mf, xf, g = (t.contiguous() for t in (w, offsets, min_factor, max_factor, grad_out.float()))
    grad_v = torch.empty_like(w)
    grad_mf = torch.empty_like(mf)
    grad_xf = torch.empty_like(xf)
    grid, meta = _launch_args(w, group)
    n, k = w.shape
    signround_bwd_kernel[grid](w, v, mf, xf, g, grad_v, grad_mf, grad_xf, n, k // group, group, k, maxq, MIN_SCALE,
                               SYM=sym, **meta)
    return grad_v, grad_mf, grad_xf


class SignRoundQDQ(torch.autograd.Function):
    """:func:`signround_qdq_ref` on the Triton kernels: the forward kernel, and the backward kernel for the
    gradients of the offsets and both factors. ``w`` is a constant (no gradient), as in the method."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, offsets: torch.Tensor, min_factor: torch.Tensor,  # noqa: ANN001
                max_factor: torch.Tensor, group: int, maxq: int, sym: bool) -> torch.Tensor:
        ctx.save_for_backward(w, offsets, min_factor, max_factor)  # no intermediates: the backward recomputes
        ctx.grid = (group, maxq, sym)
        return signround_qdq_triton(w, offsets, min_factor, max_factor, group, maxq, sym)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:  # noqa: ANN001
        w, offsets, min_factor, max_factor = ctx.saved_tensors
        grads = signround_grads_triton(w, offsets, min_factor, max_factor, grad_out, *ctx.grid)
        wanted = ctx.needs_input_grad[1:4]
        return (None, *(g if need else None for g, need in zip(grads, wanted)), None, None, None)


def aot_signature(dtype: str, config: LaunchConfig, SYM: bool = False) -> tuple[dict, dict]:
    """Argument types for ahead-of-time compilation of :func:`signround_fwd_kernel`."""
    sig = {"w_ptr": "*fp32", "v_ptr": "*fp32", "mf_ptr": "*fp32", "xf_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32",
           "G": "i32", "group": "i32", "stride": "i32", "maxq": "i32", "min_scale": "fp32", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "SYM": "constexpr"}
    return sig, {**config.constexprs(), "SYM": SYM}


def aot_signature_bwd(dtype: str, config: LaunchConfig, SYM: bool = False) -> tuple[dict, dict]:
    """Argument types for ahead-of-time compilation of :func:`signround_bwd_kernel`."""
    sig = {"w_ptr": "*fp32", "v_ptr": "*fp32", "mf_ptr": "*fp32", "xf_ptr": "*fp32", "g_ptr": "*fp32",
           "gv_ptr": "*fp32", "gmf_ptr": "*fp32", "gxf_ptr": "*fp32", "N": "i32", "G": "i32", "group": "i32",
           "stride": "i32", "maxq": "i32", "min_scale": "fp32", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
           "SYM": "constexpr"}
    return sig, {**config.constexprs(), "SYM": SYM}
