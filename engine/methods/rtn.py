"""Round-to-nearest: every group on its min-max grid, no data (``../shared/docs/awq_family.md`` §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..grid import GridSpec, default_g_idx, fake_quantize, fit_groups
from .base import LayerResult, Method

if TYPE_CHECKING:
    from ..groups import Group


class RTN(Method):
    name = "rtn"
    summary = "round to nearest on the min-max (or --mse) grid; no calibration data"
    calibrated = False
    data_parallel = "solve"  # no statistics: a pure function of the weights

    def quantize(self, group: Group, state: Any) -> list[LayerResult]:
        return [round_to_nearest(lin.weight.data, group.spec, name)
                for lin, name in zip(group.linears, group.full_names)]


def round_to_nearest(weight: torch.Tensor, spec: GridSpec, name: str = "layer") -> LayerResult:
    """Fit every group of ``weight`` [N, K] and round each weight to its nearest grid point."""
    scale, zero = fit_groups(weight, spec, name)
    g_idx = default_g_idx(weight.shape[1], spec).to(weight.device)
    idx = g_idx.long()
    q = fake_quantize(weight.float(), scale[:, idx], zero[:, idx], spec.maxq)
    return LayerResult(q, scale, zero, g_idx)
