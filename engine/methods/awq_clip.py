"""AWQ's clip search: per output row and quantization group, the clip range whose rounded weights give the
smallest output error; then the clamp.

Lin et al., AWQ, MLSys 2024 (arXiv:2306.00978), llm-awq's ``auto_clip.py`` (search, then ``apply_clip``), as
specified in ``../shared/docs/awq_family.md`` §3.4 with llmc's asymmetric variant: shrink factors
``f = 1 - i / n_grid`` for ``i < max_shrink * n_grid`` (1.00 .. 0.55), the clamped group re-fitted and rounded
on the grid, error in the exact Gram form ``d^T H_g d`` (``d = Q(clamp(w)) - w``, ``H_g`` the group's diagonal
block of the mean ``x x^T`` over every calibration token, :class:`.awq_observe.GramObserver`).

On CUDA tensors the search runs in one launch of the ``awq_clip`` kernel (every row tile x group, the shrink
factors looped inside); elsewhere (and for ``--mse`` grids or groups the kernel does not take) its PyTorch
reference, the engine's CPU path (``kernels/awq_clip.py``: ``kernels.awq_clip_search`` dispatches).
"""

from __future__ import annotations

import torch

from ... import kernels
from ..grid import GridSpec, fake_quantize_groups

# Linears whose clip is skipped (llm-awq: "q.k product is hard to clip precisely"); exact leaf names
CLIP_SKIP = ("q_proj", "k_proj")


def shrink_factors(n_grid: int, max_shrink: float) -> list[float]:
    """The clip factors tried, in order: ``1 - i / n_grid`` for ``i < max_shrink * n_grid`` (at least ``f = 1``)."""
    return [1.0 - i / n_grid for i in range(max(1, int(max_shrink * n_grid)))]


def clip_search(weight: torch.Tensor, gram: torch.Tensor, spec: GridSpec, sym_clip: bool, n_grid: int = 20,
                max_shrink: float = 0.5, force: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clip range ``(lo, hi)`` per row and group, both ``[N, G]`` (§3.4).

    Candidates ``f = 1 - i / n_grid`` for ``i < max_shrink * n_grid``: symmetric ``[-f absmax, f absmax]`` or
    asymmetric ``[f min, f max]`` (llmc); the clamped group is re-fitted and rounded on the grid, and its error
    is ``d^T H_g d`` with ``d = Q(clamp(w)) - w`` and ``H_g`` = ``gram[group]`` (mean of ``x x^T`` over tokens).
    ``f = 1`` comes first and only a strictly smaller error replaces it, so the error never grows.
    ``force``: ``kernels.FORCE`` (``"triton"`` runs the kernel on the CPU under ``TRITON_INTERPRET=1``).
    """
    n, k = weight.shape
    g = spec.effective_group(k)
    requantize = None
    if spec.mse:  # the MSE grid fit is the host's (the reference path)
        def requantize(c: torch.Tensor) -> torch.Tensor:
            return fake_quantize_groups(c.view(n, k), spec, inplace=True).view(n, k // g, g)

    return kernels.awq_clip_search(weight, gram, shrink_factors(n_grid, max_shrink), g, spec.maxq, spec.sym,
                                   sym_clip, requantize, force=force)


def apply_clip(weight: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``clamp(W, lo, hi)`` per row and group (``lo``/``hi`` ``[N, G]``)."""
    n, k = weight.shape
    g = k // lo.shape[1]
    w = weight.float().reshape(n, -1, g)
    return torch.maximum(torch.minimum(w, hi[..., None]), lo[..., None]).reshape(n, k)
