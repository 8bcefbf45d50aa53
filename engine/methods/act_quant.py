"""Activation quantization as a method sees it: any method, its quantized linears running on quantized inputs.

The quantizer and the run-time wrapper live in ``engine/activations.py`` (loaded models use them too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ..activations import ActQuantLinear, ActSpec
from ..grid import GridSpec
from .base import LayerResult, Method

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..distributed import Collective
    from ..groups import Group


class WithActivationQuant(Method):
    """Any method, with its quantized linears running on quantized inputs while the block propagates.

    Every item of the contract is the inner method's (the wrapper adds only ``wrap``); a method that declares
    ``receives_act`` (AWRQ) gets the run's setting through ``set_activation`` before the first block.
    """

    def __init__(self, inner: Method, act: ActSpec) -> None:  # no super().__init__: the options are inner's
        self.inner = inner
        self.name = inner.name
        self.summary = inner.summary
        self.Options = inner.Options
        self.options = inner.options
        self.act = act
        self.set_activation(act)

    # the declared contract, the inner method's
    @property
    def calibrated(self) -> bool:  # type: ignore[override]
        return self.inner.calibrated

    @property
    def default_act(self) -> ActSpec | None:  # type: ignore[override]
        return self.inner.default_act

    @property
    def receives_act(self) -> bool:  # type: ignore[override]
        return self.inner.receives_act

    @property
    def needs_grad(self) -> bool:  # type: ignore[override]
        return self.inner.needs_grad

    @property
    def scope(self) -> str:  # type: ignore[override]
        return self.inner.scope

    def block_scope(self, index: int) -> str:
        return self.inner.block_scope(index)

    @property
    def float_targets(self) -> bool:  # type: ignore[override]
        return self.inner.float_targets

    def block_prepass(self, index: int) -> Method | None:
        return self.inner.block_prepass(index)

    @property
    def data_parallel(self) -> str:  # type: ignore[override]
        return self.inner.data_parallel

    @property
    def data_parallel_refusal(self) -> str:  # type: ignore[override]
        return self.inner.data_parallel_refusal

    def reduce(self, state: Any, collective: Collective) -> Any:
        return self.inner.reduce(state, collective)

    def set_activation(self, act: ActSpec) -> None:
        self.act = act
        if self.inner.receives_act:
            self.inner.set_activation(act)

    def act_order_groups(self) -> str | None:
        return self.inner.act_order_groups()

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec | None:
        return self.inner.layer_grid(name, spec)

    def prepare(self, model: nn.Module, adapter: Adapter) -> None:
        self.inner.prepare(model, adapter)

    def observe(self, group: Group) -> Any:
        return self.inner.observe(group)

    def quantize(self, group: Group, state: Any) -> list[LayerResult]:
        return self.inner.quantize(group, state)

    def quantize_block(self, *args: Any, **kwargs: Any) -> Any:
        """A whole-block method's step (``scope == "block"``), the inner method's."""
        return self.inner.quantize_block(*args, **kwargs)  # type: ignore[attr-defined]

    def wrap(self, group: Group, name: str, linear: nn.Module) -> nn.Module:
        inner = self.inner.wrap(group, name, linear)
        return ActQuantLinear(linear if inner is None else inner, self.act)

    def describe(self) -> dict:
        return self.inner.describe()
