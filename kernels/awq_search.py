"""AWQ's scale grid search: every candidate scale vector at once, one launch per scale pair, no candidate weight
in memory. PyTorch references and one Triton kernel with two outputs.

For candidate ``a`` with per-input-channel scales ``s_a`` (``[A, K]``), the weight AWQ would keep is
``Q(W * s_a) / s_a`` (``Q`` = fake quantization on the min-max grid of :mod:`.grid_rule`, groups of
``group_size`` input columns; in the kernels :mod:`.grid_fit`). Lin et al., "AWQ: Activation-aware Weight
Quantization", MLSys 2024, arXiv:2306.00978, §3.2; ``../shared/docs/awq_family.md`` §3.3.

One kernel, :func:`awq_candidates_kernel`, in two modes:

* ``LOSS`` - pairs scored on one linear's output (v -> o, up -> down): the loss
  ``loss[a] = sum_{t, n} (x_t . (Q(W s_a) / s_a - W)_n)^2 / (T * N)`` on the cached inputs ``X`` [T, K];
* outputs - pairs scored on a module's output (norm -> q/k/v, norm -> gate/up): the
  candidates' linear outputs ``Y[a] = X (Q(W s_a) / s_a)^T`` ([A, T, N], ``W`` the balance linears' rows
  concatenated); the rest of the module (attention, the MLP's ``act(gate) * up`` and down_proj) runs in
  PyTorch on those outputs, batched over candidates (``engine/methods/awq_scale.py``).

Both: one program per (candidate, tile of output rows, tile of tokens); it walks the input width one
quantization group at a time, fits the group's grid on ``W * s`` in registers, forms ``Q(W s)/s`` (or its error
against ``W``) and accumulates ``X_tile @ tile^T`` (fp32 inputs: IEEE fp32 products; fp16/bf16 inputs: the tile
rounded to the inputs' dtype, tensor-core products, fp32 accumulation).

The references materialise a few candidates at a time; the loss reference uses the Gram form ``tr(E X^T X E^T)``
(``N K^2`` per candidate instead of ``T N K``) when there are more tokens than input columns, which is what the
engine runs on the CPU. Kernels and references compute the weights with the same fp32 operations in the same
order, so the weights agree bit for bit and the results up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelLimits, LaunchConfig
from .grid_fit import fake_quantize as fake_quantize_tile
from .grid_fit import minmax_fit
from .grid_rule import MIN_SCALE, fake_quantize, minmax_scale_zero

CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=16, BLOCK_T=32),
)
# The module searches' linear outputs: an output tile [BLOCK_T, BLOCK_N] stored per program.
LINEAR_CONFIGS: tuple[LaunchConfig, ...] = (
    LaunchConfig.of(num_warps=4, num_stages=1, BLOCK_N=32, BLOCK_T=64),
    LaunchConfig.of(num_warps=8, num_stages=1, BLOCK_N=32, BLOCK_T=64),  # groups of 128+: fp32 tiles spill at 4
)
# Inputs in any of these dtypes (weights and scales are fp32); group sizes: powers of two from 16 to 256
# (one group is one tile of the reduction); per-channel grids and other sizes use the reference.
LIMITS = KernelLimits(dtypes=("fp16", "bf16", "fp32"))
KERNEL_GROUPS = (16, 32, 64, 128, 256)
CANDIDATE_CHUNK = 4  # candidates the reference materialises at once (memory: CHUNK x N x K fp32)


def scaled_fake_quantize(w: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                         sym: bool) -> torch.Tensor:
    """``Q(W * s_a) / s_a`` for every candidate: ``[A, N, K]`` fp32 (``group_size=-1``: one group per row)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    sf = scales.float()[:, None, :]
    ws = w.float()[None] * sf  # [A, N, K], overwritten step by step below (one buffer, same fp32 operations)
    grouped = ws.view(ws.shape[0], n, k // g, g)
    lo, hi = torch.aminmax(grouped, dim=3)
    scale, zero = minmax_scale_zero(lo, hi, maxq, sym)
    fake_quantize(grouped, scale[..., None], zero[..., None], maxq, inplace=True)
    return ws.div_(sf)


def scaled_weight_error(w: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                        sym: bool) -> torch.Tensor:
    """``Q(W * s_a) / s_a - W`` for every candidate: ``[A, N, K]`` fp32."""
    return scaled_fake_quantize(w, scales, group_size, maxq, sym).sub_(w.float()[None])


def awq_loss_ref(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                 sym: bool) -> torch.Tensor:
    """Reference: ``loss[a]`` (fp32 ``[A]``) as in the module docstring; ``x`` [T, K], ``scales`` [A, K]."""
    t, k = x.shape
    n = w.shape[0]
    xf = x.float()
    gram = xf.t() @ xf if t > k else None
    out = []
    for a0 in range(0, scales.shape[0], CANDIDATE_CHUNK):
        err = scaled_weight_error(w, scales[a0:a0 + CANDIDATE_CHUNK], group_size, maxq, sym)
        if gram is not None:
            total = ((err @ gram) * err).sum(dim=(1, 2))
        else:
            total = (xf[None] @ err.transpose(1, 2)).pow(2).sum(dim=(1, 2))
        out.append(total / (t * n))
    return torch.cat(out)


def awq_linear_ref(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                   sym: bool) -> torch.Tensor:
    """Reference of :func:`awq_candidates_kernel`'s outputs: ``Y[a] = X (Q(W s_a) / s_a)^T``, ``[A, T, N]`` in
    ``x``'s dtype (16-bit inputs: the weights rounded to that dtype, as a module holding them computes)."""
    out = []
    for a0 in range(0, scales.shape[0], CANDIDATE_CHUNK):
        wq = scaled_fake_quantize(w, scales[a0:a0 + CANDIDATE_CHUNK], group_size, maxq, sym)
        out.append(x @ wq.to(x.dtype).transpose(1, 2))
    return torch.cat(out)


@triton.jit
def awq_candidates_kernel(
    w_ptr, x_ptr, s_ptr, out_ptr, N, K, T, stride_w, stride_x, stride_s, stride_oa, stride_ot, maxq, min_scale,
    inv_count, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
    HALF: tl.constexpr, LOSS: tl.constexpr,
):
    """Program (a, rows tile, tokens tile) over ``X_tile @ tile^T`` with ``tile`` = ``(Q(W s_a)/s_a - W)`` (``LOSS``:
    adds the sum of its squares times ``inv_count`` to ``out[a]``) or ``Q(W s_a)/s_a`` (stores
    ``out[a, tokens, rows]``, ``out`` [A, T, N])."""
    a = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    toks = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, GROUP)
    row_ok = rows < N
    tok_ok = toks < T
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        kk = k0 + cols
        w = tl.load(w_ptr + rows[:, None] * stride_w + kk[None, :], mask=row_ok[:, None], other=0.0)
        s = tl.load(s_ptr + a * stride_s + kk)
        ws = w * s[None, :]
        scale, zero = minmax_fit(tl.min(ws, axis=1), tl.max(ws, axis=1), maxq, min_scale, SYM)
        tile = tl.math.div_rn(fake_quantize_tile(ws, scale[:, None], zero[:, None], maxq), s[None, :])
        if LOSS:
            tile = tile - w
        x = tl.load(x_ptr + toks[:, None] * stride_x + kk[None, :], mask=tok_ok[:, None], other=0.0)
        if HALF:  # 16-bit inputs: the tile in their dtype, tensor-core dot with fp32 accumulation
            acc = tl.dot(x, tl.trans(tile.to(x.dtype)), acc)
        else:
            acc = tl.dot(x, tl.trans(tile), acc, input_precision="ieee")
    if LOSS:
        tl.atomic_add(out_ptr + a, tl.sum(tl.sum(acc * acc, axis=1), axis=0) * inv_count)
    else:
        out = out_ptr + a * stride_oa + toks[:, None] * stride_ot + rows[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tok_ok[:, None] & row_ok[None, :])


def pick_config(group_size: int) -> LaunchConfig:
    """One configuration: 32 rows x 64 tokens per program (the error tile is 32 x GROUP fp32 registers)."""
    return CONFIGS[0]


def excluded(target: str, dtype: str, config: LaunchConfig) -> str | None:
    """Why the launcher never runs ``config`` for ``dtype`` on ``target`` (None: it may)."""
    if target == "sm_75" and dtype in ("fp16", "bf16"):
        return ("Triton emits no tensor-core dot on sm_75 (FMA fallback, and the 16-bit tile spills); "
                "the dispatcher uses the PyTorch reference there")
    return None


def kernel_usable(w: torch.Tensor, group_size: int, x: torch.Tensor | None = None) -> bool:
    """Whether the Triton path takes this grid (one group is one reduction tile) and, on a GPU, whether
    :func:`excluded` allows the launch for ``x``'s device and dtype."""
    if group_size not in KERNEL_GROUPS or w.shape[1] % group_size:
        return False
    if x is None or not x.is_cuda:
        return True
    from .aot.catalog import device_target

    target = device_target(x.device)
    dtype = _TORCH_TO_TRITON.get(x.dtype, "fp32")
    return target is None or excluded(target, dtype, pick_config(group_size)) is None


def _signature(dtype: str, out: str) -> dict:
    return {"w_ptr": "*fp32", "x_ptr": f"*{dtype}", "s_ptr": "*fp32", "out_ptr": out, "N": "i32", "K": "i32",
            "T": "i32", "stride_w": "i32", "stride_x": "i32", "stride_s": "i32", "stride_oa": "i32",
            "stride_ot": "i32", "maxq": "i32", "min_scale": "fp32", "inv_count": "fp32", "BLOCK_N": "constexpr",
            "BLOCK_T": "constexpr", "GROUP": "constexpr", "SYM": "constexpr", "HALF": "constexpr",
            "LOSS": "constexpr"}


def aot_signature(dtype: str, config: LaunchConfig, GROUP: int = 64) -> tuple[dict, dict]:
    """Argument types for ahead-of-time compilation of :func:`awq_candidates_kernel` computing losses
    (``dtype``: the inputs')."""
    consts = {**config.constexprs(), "GROUP": GROUP, "SYM": False, "HALF": dtype in ("fp16", "bf16"), "LOSS": True}
    return _signature(dtype, "*fp32"), consts


def aot_signature_linear(dtype: str, config: LaunchConfig, GROUP: int = 64) -> tuple[dict, dict]:
    """The same for the candidates' outputs (``dtype``: inputs and outputs)."""
    consts = {**config.constexprs(), "GROUP": GROUP, "SYM": False, "HALF": dtype in ("fp16", "bf16"), "LOSS": False}
    return _signature(dtype, f"*{dtype}"), consts


def pick_linear_config(group_size: int) -> LaunchConfig:
    """32 rows x 64 tokens per program; 8 warps from groups of 128 (the weight tiles are 32 x GROUP fp32)."""
    return LINEAR_CONFIGS[0] if group_size <= 64 else LINEAR_CONFIGS[1]


_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def awq_loss_triton(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                    sym: bool) -> torch.Tensor:
    """Triton launcher with the semantics of :func:`awq_loss_ref`: one launch for every candidate."""
    w, x, scales = _launch_inputs(w, x, scales, group_size)
    n, k = w.shape
    t = x.shape[0]
    loss = torch.zeros(scales.shape[0], dtype=torch.float32, device=w.device)
    config = pick_config(group_size)
    meta = config.constexprs()
    grid = (scales.shape[0], triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(t, meta["BLOCK_T"]))
    awq_candidates_kernel[grid](w, x, scales, loss, n, k, t, w.stride(0), x.stride(0), scales.stride(0), 0, 0, maxq,
                                MIN_SCALE, 1.0 / (t * n), GROUP=group_size, SYM=sym, HALF=x.dtype != torch.float32,
                                LOSS=True, num_warps=config.num_warps, num_stages=config.num_stages, **meta)
    return loss


def _launch_inputs(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked, contiguous launch arguments (fp32 weights and scales; inputs in a dtype the kernels take)."""
    from ..errors import TritonqError

    if not kernel_usable(w, group_size):
        raise TritonqError(f"the AWQ search kernels take group sizes {KERNEL_GROUPS} dividing the input width; "
                           f"got group size {group_size} for width {w.shape[1]}")
    if _TORCH_TO_TRITON.get(x.dtype) not in LIMITS.dtypes:
        x = x.float()
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        x = x.float()  # the interpreter has no bf16 loads into fp32 math; values are unchanged
    return w.float().contiguous(), x.contiguous(), scales.float().contiguous()


def awq_linear_triton(w: torch.Tensor, x: torch.Tensor, scales: torch.Tensor, group_size: int, maxq: int,
                      sym: bool) -> torch.Tensor:
    """Triton launcher with the semantics of :func:`awq_linear_ref`: one launch for every candidate."""
    out_dtype = x.dtype
    w, x, scales = _launch_inputs(w, x, scales, group_size)
    n, k = w.shape
    t = x.shape[0]
    y = torch.empty(scales.shape[0], t, n, dtype=out_dtype, device=w.device)
    config = pick_linear_config(group_size)
    meta = config.constexprs()
    grid = (scales.shape[0], triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(t, meta["BLOCK_T"]))
    awq_candidates_kernel[grid](w, x, scales, y, n, k, t, w.stride(0), x.stride(0), scales.stride(0), y.stride(0),
                                y.stride(1), maxq, MIN_SCALE, 1.0, GROUP=group_size, SYM=sym,
                                HALF=x.dtype != torch.float32, LOSS=False, num_warps=config.num_warps,
                                num_stages=config.num_stages, **meta)
    return y
