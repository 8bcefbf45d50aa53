"""The interface every quantization method implements, and the registry of methods by name.

A method quantizes one *group* of linears that share an input (q/k/v, gate/up, ...): it gets their
weights, the shared Hessian when it asks for one, and the grid; it returns, per linear, the
fake-quantized weight and the grid parameters the packers need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import TritonqError
from .grid import GridSpec


@dataclass
class LayerResult:
    weight: torch.Tensor  # fake-quantized, fp32 [N, K], original column order
    scale: torch.Tensor  # fp32 [N, G]
    zero: torch.Tensor  # fp32 [N, G], integer valued
    g_idx: torch.Tensor  # int32 [K]
    info: dict = field(default_factory=dict)


class Method:
    """Base class: ``name``, whether calibration data and a Hessian are needed, and ``quantize_group``."""

    name = "base"
    needs_calibration = False
    needs_hessian = False

    def quantize_group(
        self, weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: GridSpec, names: list[str]
    ) -> list[LayerResult]:
        raise NotImplementedError

    def describe(self) -> dict:
        """Method settings recorded in ``quantization.json``."""
        return {}


def split_rows(stacked: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo ``torch.cat(weights)`` along the output dimension."""
    return list(torch.split(stacked, [w.shape[0] for w in weights], dim=0))


METHOD_NAMES = ("rtn", "gptq")


def get_method(name: str, **options) -> Method:
    """Instantiate a method by name with its options (unknown options for that method are ignored)."""
    if name == "rtn":
        from .rtn import RTN

        return RTN()
    if name == "gptq":
        from .gptq import GPTQ

        keys = ("act_order", "damp", "block_size")
        return GPTQ(**{k: options[k] for k in keys if k in options})
    raise TritonqError(f"unknown method {name!r}; choose one of: {', '.join(METHOD_NAMES)}")
