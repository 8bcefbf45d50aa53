"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, arXiv:2210.17323), following ``../shared/docs/awq_family.md`` §2:

1. dead inputs (``H_jj = 0``): ``H_jj = 1`` and ``W[:, j] = 0``;
2. act-order: columns by decreasing ``diag(H)``; ``static`` groups (the default of ``--act-order``):
   every group's grid is fitted up front on the unpermuted columns, so column ``j`` keeps group ``j // g``
   and ``g_idx`` stays trivial; ``dynamic`` groups (GPTQModel's ``desc_act`` without static groups):
   groups are runs of ``g`` columns in the permuted order, fitted when they start, and ``g_idx`` records
   them (kernels then gather scales per input row);
3. damping ``H += damp * mean(diag H) * I`` (retried with more damping on Cholesky failure);
4. ``U = chol(H^-1)^T`` (upper), then blocked quantization with lazy trailing updates (128 columns),
   grids fitted from the up-to-date working tile at every group start (our default; the reference fits
   the second group of a 128-block on stale values when ``g = 64``).

The linears of a group share one Hessian, so their rows are stacked and solved at once.
"""

from __future__ import annotations

import torch

from ..errors import TritonqError
from .grid import GridSpec, default_g_idx, fit_groups
from .hessian import blocked_quantize, check_finite, inverse_cholesky
from .methods import LayerResult, Method, split_rows


class GPTQ(Method):
    name = "gptq"
    needs_calibration = True
    needs_hessian = True

    def __init__(self, act_order: bool | str = False, damp: float = 0.01, block_size: int = 128) -> None:
        modes = {False: None, None: None, "none": None, True: "static", "static": "static", "dynamic": "dynamic"}
        if act_order not in modes:
            raise TritonqError(f"act-order must be static or dynamic, got {act_order!r}")
        if not 0 < damp < 10:
            raise TritonqError(f"--damp must be in (0, 10), got {damp}")
        if block_size < 1:
            raise TritonqError(f"--block-size must be positive, got {block_size}")
        self.act_order = modes[act_order]
        self.damp = damp
        self.block_size = block_size

    def describe(self) -> dict:
        return {"act_order": self.act_order is not None, "act_order_groups": self.act_order,
                "static_groups": self.act_order == "static", "damp": self.damp,
                "block_size": self.block_size}

    def quantize_group(
        self, weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: GridSpec, names: list[str],
        force: str | None = None,
    ) -> list[LayerResult]:
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} sharing its input)"
        assert hessian is not None
        check_finite(hessian, label)
        w = torch.cat([x.float() for x in weights], dim=0).to(hessian.device)
        k = w.shape[1]
        for name in names:
            spec.groups_for(k, name)
        h = hessian.clone()
        dead = torch.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

        g_idx = default_g_idx(k, spec).to(w.device)
        preset = None
        if spec.group_size == -1 or self.act_order == "static":
            # per-row grids, and static groups, are fitted on the original (unpermuted) weights
            preset = fit_groups(w, spec, label)

        perm = None
        work_g_idx = g_idx
        if self.act_order:
            perm = torch.argsort(torch.diag(h), descending=True)
            w = w[:, perm]
            h = h[perm][:, perm]
            if self.act_order == "static":
                work_g_idx = g_idx[perm]
            else:  # dynamic: groups are runs of g columns in the new order; g_idx records them
                g_idx = torch.empty_like(g_idx)
                g_idx[perm] = work_g_idx
        factor = inverse_cholesky(h, self.damp, label)
        res = blocked_quantize(w, factor.upper, spec, work_g_idx, self.block_size, preset, force=force)
        q = res.weight
        if perm is not None:
            q = q[:, torch.argsort(perm)]
        info = {"loss": res.loss, "damp": factor.damp}
        out = []
        for qw, s, z in zip(split_rows(q, weights), split_rows(res.scale, weights), split_rows(res.zero, weights)):
            out.append(LayerResult(qw, s, z, g_idx, dict(info)))
        return out
