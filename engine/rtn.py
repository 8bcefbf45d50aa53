"""Round-to-nearest: every group on its min-max grid, no data (``../shared/docs/awq_family.md`` §1)."""

from __future__ import annotations

import torch

from .grid import GridSpec, default_g_idx, fake_quantize, fit_groups
from .methods import LayerResult, Method


class RTN(Method):
    name = "rtn"

    def quantize_group(
        self, weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: GridSpec, names: list[str]
    ) -> list[LayerResult]:
        results = []
        for weight, name in zip(weights, names):
            k = weight.shape[1]
            scale, zero = fit_groups(weight, spec, name)
            g_idx = default_g_idx(k, spec).to(weight.device)
            idx = g_idx.long()
            q = fake_quantize(weight.float(), scale[:, idx], zero[:, idx], spec.maxq)
            results.append(LayerResult(q, scale, zero, g_idx))
        return results
