"""Activation quantization as a method sees it: any method, its quantized linears running on quantized inputs.

The quantizer and the run-time wrapper live in ``engine/activations.py`` (loaded models use them too).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..activations import ActQuantLinear, ActSpec
from .base import LayerResult, Method


class WithActivationQuant(Method):
    """Any method, with its quantized linears running on quantized inputs while the block propagates.

    Delegates everything else to ``inner``; a method that needs the setting itself (SmoothQuant, AWRQ: class
    attribute ``uses_act``) receives it as ``inner.act`` before the first block.
    """

    def __init__(self, inner: Method, act: ActSpec) -> None:  # no super().__init__: the options are inner's
        self.inner = inner
        self.act = act
        self.name = inner.name
        self.summary = inner.summary
        self.Options = inner.Options
        self.options = inner.options
        self.calibrated = inner.calibrated
        if getattr(inner, "uses_act", False):
            inner.act = act

    def observe(self, group: Any) -> Any:
        return self.inner.observe(group)

    def quantize(self, group: Any, state: Any) -> list[LayerResult]:
        return self.inner.quantize(group, state)

    def wrap(self, group: Any, name: str, linear: nn.Module) -> nn.Module:
        inner = self.inner.wrap(group, name, linear)
        return ActQuantLinear(linear if inner is None else inner, self.act)

    def describe(self) -> dict:
        return self.inner.describe()
