"""The shared second-order core: Hessian accumulation, damping with retries, the inverse Cholesky
factor, and blocked quantization with error propagation (GPTQ now; BoA and AWRQ reuse it).

References: Frantar et al., "GPTQ" (arXiv:2210.17323), Algorithm 1 and the lazy batch / Cholesky
reformulation of §3; damping retries as GPTQModel's ``damp_auto_increment``
(``../shared/docs/awq_family.md`` §2 step 5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..errors import TritonqError, warn
from .grid import GridSpec, fit_groups

if TYPE_CHECKING:
    from .distributed import Collective


class HessianAccumulator:
    """Running mean of ``2 x x^T`` over calibration tokens of one linear input (fp32 [K, K]).

    Several ranks (``collective`` given, world > 1): rank 0 accumulates as one process does; a later rank keeps
    its inputs and :meth:`reduce` folds them, in order, onto the Hessian of the ranks before it
    (:meth:`Collective.in_rank_order`), so every rank ends with one process's Hessian, bit for bit. The cost is
    memory: a later rank holds its share of this input (T / world x K, the model's dtype) until the solve.
    Without ``collective`` :meth:`reduce` merges the ranks' means instead (close, not bitwise).
    """

    def __init__(self, in_features: int, device: torch.device | str, collective: Collective | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0
        self.in_order = collective is not None and collective.world > 1
        self.kept: list[torch.Tensor] = []  # a later rank's inputs, folded in by ``reduce``
        self._keep = self.in_order and collective.rank > 0

    def add(self, x: torch.Tensor) -> None:
        x2d = x.reshape(-1, x.shape[-1])
        if self._keep:
            self.kept.append(x2d.clone())
            self.tokens += x2d.shape[0]
            return
        self.tokens = kernels.hessian_accumulate(self.hessian, x2d, self.tokens)

    def take(self) -> torch.Tensor:
        """The Hessian, handed over: the accumulator lets go of it, so a solve that makes its own working copy
        can free this one (one K x K less at the peak: 0.8 GB for an 8B model's down_proj in fp32)."""
        hessian, self.hessian = self.hessian, None
        return hessian

    def reduce(self, collective: Collective) -> None:
        """The Hessian of every rank's tokens, the same on every rank (nothing changes at world 1): one process's
        running mean continued rank after rank (``in_order``), or else the ranks' means merged,
        ``sum_r H_r t_r / sum_r t_r`` in float64 in rank order (:meth:`Collective.sum`), rounded once to fp32."""
        if collective.world == 1:
            return
        counts = collective.counts(self.tokens)
        if self.in_order:
            seen = sum(counts[: collective.rank])

            def resume(carry: list[torch.Tensor]) -> list[torch.Tensor]:
                hessian, done = carry[0], seen
                while self.kept:
                    done = kernels.hessian_accumulate(hessian, self.kept.pop(0), done)
                return [hessian]

            self.hessian = collective.in_rank_order([self.hessian], resume)[0]
            self._keep = False
        else:
            weighted = collective.sum(self.hessian.double() * self.tokens)
            self.hessian = (weighted / max(sum(counts), 1)).float()
        self.tokens = sum(counts)


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
    return inverse_cholesky_reversed(hessian.flip(0, 1), damp, layer, max_tries)


def inverse_cholesky_reversed(reversed_h: torch.Tensor, damp: float, layer: str,
                              max_tries: int = 8) -> InverseFactor:
    """:func:`inverse_cholesky` of ``H`` given ``J H J`` (rows and columns in reverse order), which it damps in place
    and consumes: a caller that builds the reversed matrix in its own gather (GPTQ's act-order permutation) and
    lets go of it makes no other K x K copy."""
    # With J the order reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is
    # upper triangular with a positive diagonal: it is U. One Cholesky and one triangular solve instead of
    # a Cholesky, an inverse and a second Cholesky (half the time on the CPU, and no less accurate).
    # Memory: three K x K matrices at the peak, the input included (the down_proj of an 8B model has K = 14336:
    # 0.8 GB each in fp32). The damping goes onto the input's diagonal in place (the same fp32 sum on each
    # diagonal entry as adding ``damp * mean * I``) and the undamped diagonal is kept aside for a retry; the
    # input is let go once it is factored.
    k = reversed_h.shape[0]
    mean_diag = torch.mean(torch.diag(reversed_h).flip(0)).item()  # summed in H's own order
    diagonal = torch.diag(reversed_h).clone()
    tried = damp
    for _ in range(max_tries):
        reversed_h.diagonal().copy_(diagonal)
        reversed_h.diagonal().add_(tried * mean_diag)
        lower, info = torch.linalg.cholesky_ex(reversed_h)
        if info.item() == 0:
            reversed_h = None  # the caller's reference is the only one left (GPTQ drops it: one K x K less)
            eye = torch.eye(k, device=lower.device, dtype=lower.dtype)
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            del eye
            if torch.isfinite(inverse).all():
                del lower
                upper = inverse.flip(0, 1)
                del inverse
                if tried != damp:
                    warn(f"{layer}: Cholesky failed at damp {damp}; succeeded with damp {tried:g}")
                return InverseFactor(upper.contiguous(), tried)
            # rare: factored but the inverse overflowed. Retry from L L^T (the damped matrix to within rounding)
            # with the undamped diagonal put back, as the input is gone
            reversed_h = lower @ lower.mT
            del lower, inverse
        tried *= 10.0
    raise TritonqError(
        f"the Hessian of {layer} is not positive definite even with damping {tried / 10:g}; "
        "use more calibration samples (--nsamples) or a larger --damp"
    )


def check_block_size(block_size: int) -> None:
    """Validate ``--block-size`` before any work starts (GPTQ's option check calls it).

    Every positive width is supported: :func:`blocked_quantize` runs a lazy block wider than one kernel
    launch holds (``kernels.gptq_max_cols()``, 256) as several launches with a trailing update between
    them, which leaves the GPTQ result unchanged.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise TritonqError(f"--block-size must be a positive integer (e.g. 128), got {block_size!r}")


def effective_block_size(block_size: int, group: int) -> int:
    """Lazy-update block width for grids fitted at group starts: a multiple of the group size, so that
    every group starts a block and lies inside it (a group wider than ``block_size`` is one block)."""
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
    grid has a shrink search or a group is wider than one launch: blocks then hold exactly one group).

    Lazy blocks of ``block_size`` columns (GPTQ §3, "lazy batch updates") run as launches of at most
    ``kernels.gptq_max_cols()`` columns: inside a block, each launch is followed by the update of the
    block's remaining columns by that launch's errors, and the block's errors then update every column
    after the block in one GEMM. Both orders apply the same rank-1 updates of Algorithm 1 (only the fp32
    summation order differs), so any ``block_size`` is supported.
    """
    check_block_size(block_size)
    w = weight.float().clone()
    n, k = w.shape
    group = spec.effective_group(k)
    groups = k // group
    device = w.device
    max_cols = kernels.gptq_max_cols()
    g_idx = g_idx.to(device=device, dtype=torch.int32).contiguous()
    if preset is not None:
        scale, zero = (t.to(device=device, dtype=torch.float32).contiguous() for t in preset)
        width, fit_in_kernel, fit_on_host = block_size, False, False
    else:
        scale = torch.zeros(n, groups, device=device, dtype=torch.float32)
        zero = torch.zeros_like(scale)
        # the kernel fits a group only when the whole group is in one launch
        fit_on_host = spec.mse or group > max_cols
        fit_in_kernel = not fit_on_host
        width = group if fit_on_host else effective_block_size(block_size, group)
        row_spec = dataclasses.replace(spec, group_size=-1)
    # launch width: with in-kernel fits a multiple of the group, so that every launch starts at a group start
    sub = effective_block_size(max_cols, group) if fit_in_kernel else max_cols
    q_all = torch.empty_like(w)
    loss = 0.0
    for c0 in range(0, k, width):
        ncols = min(width, k - c0)
        c1 = c0 + ncols
        if fit_on_host:  # the block is exactly one group, fitted on its up-to-date columns
            s, z = fit_groups(w[:, c0:c1], row_spec)
            scale[:, c0 // group], zero[:, c0 // group] = s[:, 0], z[:, 0]
        # errors of the block, transposed like the kernels' output ([ncols, N] rows; read as a column-major
        # [N, ncols] view by the trailing update), filled launch by launch when the block needs several
        err_t = torch.empty(ncols, n, device=device, dtype=torch.float32) if ncols > sub else None
        for s0 in range(c0, c1, sub):
            s1 = min(s0 + sub, c1)
            q, err = kernels.gptq_quantize_block(w, factor, s0, s1 - s0, scale, zero, g_idx, group, spec.maxq,
                                                 spec.sym, fit_in_kernel, force=force)
            q_all[:, s0:s1] = q
            loss += 0.5 * float((err * err).sum())
            if err_t is None:
                continue
            err_t[s0 - c0:s1 - c0] = err.t()
            if s1 < c1:
                kernels.trailing_update(w[:, s1:c1], err, factor[s0:s1, s1:c1], force=force)
        if c1 < k:
            block_err = err if err_t is None else err_t.t()
            kernels.trailing_update(w[:, c1:], block_err, factor[c0:c1, c1:], force=force)
    return BlockedResult(q_all, scale, zero, loss)
