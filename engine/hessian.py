"""The shared second-order core: Hessian accumulation, damping with retries, the inverse Cholesky
factor, and blocked quantization with error propagation (GPTQ now; BoA and AWRQ reuse it).

References: Frantar et al., "GPTQ" (arXiv:2210.17323), Algorithm 1 and the lazy batch / Cholesky
reformulation of §3; damping retries as GPTQModel's ``damp_auto_increment``
(``../shared/docs/awq_family.md`` §2 step 5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import kernels
from ..errors import TritonqError, warn
from .grid import GridSpec, fit_groups


class HessianAccumulator:
    """Running mean of ``2 x x^T`` over calibration tokens of one linear input (fp32 [K, K])."""

    def __init__(self, in_features: int, device: torch.device | str) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x2d = x.reshape(-1, x.shape[-1])
        self.tokens = kernels.hessian_accumulate(self.hessian, x2d, self.tokens)


def check_finite(hessian: torch.Tensor, layer: str) -> None:
    if not torch.isfinite(hessian).all():
        raise TritonqError(
            f"non-finite values in the Hessian of {layer} (its inputs overflowed); "
            "run with --dtype bfloat16 or --dtype float32, or check the model's float outputs"
        )


@dataclass
class InverseFactor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` and the damping used."""

    upper: torch.Tensor
    damp: float


def inverse_cholesky(hessian: torch.Tensor, damp: float, layer: str, max_tries: int = 8) -> InverseFactor:
    """Damp ``H``, invert it through Cholesky and return the upper factor of the inverse.

    A failed factorisation is retried with ten times the damping (with a warning naming the layer);
    after ``max_tries`` failures the error says what to change.
    """
    mean_diag = torch.mean(torch.diag(hessian)).item()
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    tried = damp
    for _ in range(max_tries):
        lower, info = torch.linalg.cholesky_ex(hessian + tried * mean_diag * eye)
        if info.item() == 0:
            # cholesky_solve against I: same result as cholesky_inverse, several times faster on the CPU
            inverse = torch.cholesky_solve(eye, lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                if tried != damp:
                    warn(f"{layer}: Cholesky failed at damp {damp}; succeeded with damp {tried:g}")
                return InverseFactor(upper.contiguous(), tried)
        tried *= 10.0
    raise TritonqError(
        f"the Hessian of {layer} is not positive definite even with damping {tried / 10:g}; "
        "use more calibration samples (--nsamples) or a larger --damp"
    )


def effective_block_size(block_size: int, group: int, in_features: int) -> int:
    """Lazy-update block width: a multiple of the group size so every group starts a block."""
    if group >= in_features:
        return min(block_size, in_features)
    if group >= block_size:
        return group
    return (block_size // group) * group


@dataclass
class BlockedResult:
    weight: torch.Tensor  # fake-quantized [N, K] fp32, in working column order
    scale: torch.Tensor  # [N, G]
    zero: torch.Tensor  # [N, G]
    loss: float  # sum over columns of (w - q)^2 / U_jj^2 / 2


def blocked_quantize(
    weight: torch.Tensor,
    factor: torch.Tensor,
    spec: GridSpec,
    g_idx: torch.Tensor,
    block_size: int = 128,
    preset: tuple[torch.Tensor, torch.Tensor] | None = None,
    force: str | None = None,
) -> BlockedResult:
    """Quantize ``weight`` [N, K] column by column with error feedback through ``factor`` (upper U).

    Grids: ``preset`` (scale, zero [N, G], read through ``g_idx``) if given; otherwise each group is
    fitted from the up-to-date working columns when it starts (in the kernel, or on the host when the
    grid has a shrink search: blocks then hold exactly one group).
    """
    w = weight.float().clone()
    n, k = w.shape
    group = spec.effective_group(k)
    groups = k // group
    device = w.device
    g_idx = g_idx.to(device=device, dtype=torch.int32).contiguous()
    if preset is not None:
        scale, zero = (t.to(device=device, dtype=torch.float32).contiguous() for t in preset)
        width, fit_in_kernel, fit_on_host = block_size, False, False
    else:
        scale = torch.zeros(n, groups, device=device, dtype=torch.float32)
        zero = torch.zeros_like(scale)
        fit_on_host = spec.mse or group > 256
        fit_in_kernel = not fit_on_host
        width = group if fit_on_host else effective_block_size(block_size, group, k)
        row_spec = dataclasses.replace(spec, group_size=-1)
    q_all = torch.empty_like(w)
    loss = 0.0
    for c0 in range(0, k, width):
        ncols = min(width, k - c0)
        if fit_on_host:  # the block is exactly one group
            s, z = fit_groups(w[:, c0:c0 + ncols], row_spec)
            scale[:, c0 // group], zero[:, c0 // group] = s[:, 0], z[:, 0]
        q, err = kernels.gptq_quantize_block(w, factor, c0, ncols, scale, zero, g_idx, group, spec.maxq,
                                             spec.sym, fit_in_kernel, force=force)
        q_all[:, c0:c0 + ncols] = q
        loss += 0.5 * float((err * err).sum())
        if c0 + ncols < k:
            kernels.trailing_update(w[:, c0 + ncols:], err, factor[c0:c0 + ncols, c0 + ncols:], force=force)
    return BlockedResult(q_all, scale, zero, loss)
