"""The interface every quantization method implements.

The pipeline (``pipeline.py``) walks the linear groups of each block in dependency order. For each group
it calls ``method.observe(group)``, where the method registers what it wants to see while the calibration
tokens pass (inputs or outputs of named modules of the block, the attention's queries and keys after the
rotary embedding); then it runs the calibration pass, only as far as those observations need; then it
calls ``method.quantize(group, state)`` with whatever ``observe`` returned. ``quantize`` may fold scales
through the adapter's pairs (``group.fold``) and returns, per linear, the fake-quantized weight and the
grid parameters the packers need. ``wrap`` may replace a quantized linear for the rest of the block's
propagation (activation quantization). The pipeline knows nothing else about a method.

Two further doors: ``prepare(model, adapter)`` runs once on the whole float model before calibration (the
block inputs are captured after it), and a method with ``scope = "block"`` is handed whole blocks instead of
linear groups: ``quantize_block(block)`` gets the block, its calibration inputs and the float block's outputs
on them (``groups.BlockGroup``), with autograd enabled when ``needs_grad``; ``block_prepass(index)`` may name a
group-scope method that runs on the block first (AutoRound's ``--init awq``: AWQ's scales, folded).

Several ranks (``engine/distributed.py``): each rank observes its own share of the calibration windows, then
``reduce(state, collective)`` makes ``state`` the statistics of every rank's windows, identical on every rank.
``data_parallel`` declares what happens next: ``"solve"`` - ``quantize`` is a pure function of the reduced state
and the weights, linear by linear, so the pipeline solves each linear on one owner rank (spread by cost) and
broadcasts the results; ``"replicated"`` - every rank runs ``quantize`` on the same reduced state (it folds
scales into the block, so every rank must), reducing inside where it scores data (AWQ's search losses through
``group.collective``); ``"refused"`` - the run stops at preflight with ``data_parallel_refusal``.

Adding a method is one file with a ``Method`` subclass (and an options dataclass) plus one line in
``registry.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ...errors import TritonqError
from ..activations import ActSpec
from ..grid import GridSpec

if TYPE_CHECKING:
    from ..adapters import Adapter
    from ..distributed import Collective
    from ..groups import BlockGroup, Group


@dataclass
class LayerResult:
    weight: torch.Tensor  # fake-quantized, fp32 [N, K], original column order
    scale: torch.Tensor  # fp32 [N, G]
    zero: torch.Tensor  # fp32 [N, G], integer valued
    g_idx: torch.Tensor  # int32 [K]
    info: dict = field(default_factory=dict)
    spec: GridSpec | None = None  # the layer's grid; the pipeline fills in the group's when a method leaves it None


@dataclass(frozen=True)
class NoOptions:
    """Options of a method that has none."""


class Method:
    """Base class. ``name`` keys the registry; ``Options`` is a frozen dataclass of the method's settings
    (the CLI derives one flag per field, help text from ``field(metadata={"help": ...})``); ``calibrated``
    says whether the method uses calibration data at all (RTN does not, so none is loaded)."""

    name: ClassVar[str] = "base"
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    calibrated: ClassVar[bool] = True
    # The declared contract. Preflight reads it once, before calibration; nothing probes a method with getattr.
    default_act: ClassVar[ActSpec | None] = None  # activations quantized by default (None: weight-only)
    receives_act: ClassVar[bool] = False  # the run's activation setting is handed over (``set_activation``)
    needs_grad: ClassVar[bool] = False  # quantize runs with autograd enabled
    scope: ClassVar[str] = "group"  # "group": ``quantize(group)`` per linear group; "block": ``quantize_block``
    # block scope: the targets are the float block's outputs on the float model's own inputs (a second activation
    # stream, as AutoRound's), not on the quantized path's
    float_targets: ClassVar[bool] = False
    data_parallel: ClassVar[str] = "refused"  # on several ranks: "solve", "replicated" or "refused" (docstring)
    data_parallel_refusal: ClassVar[str] = "it does not declare how its statistics are reduced across ranks"

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        if not isinstance(self.options, self.Options):
            raise TritonqError(f"{type(self).__name__} takes {self.Options.__name__} options, "
                               f"got {type(self.options).__name__}")

    def act_order_groups(self) -> str | None:
        """How the saved ``g_idx`` orders groups: None (no act-order), ``"static"`` (every group's grid fixed
        before reordering: the default ``g_idx``) or ``"dynamic"`` (groups follow the permuted order)."""
        return None

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec | None:
        """The grid of linear ``name`` (the model's full name) given the run's ``spec``: mixed precision. None leaves
        the linear in float (a recipe's ``skip``): the pipeline passes its group by, the formats keep it float."""
        return spec

    def block_prepass(self, index: int) -> Method | None:
        """A block-scope method's first step on block ``index``: a group-scope method the pipeline runs on it in
        its staged loop before ``quantize_block`` (e.g. AWQ's scale search and fold, which needs the per-group
        observations). Its folds stay, and the weights it returns are written, so it returns the (folded) float
        weights the block method starts from. Default: none."""
        return None

    def block_scope(self, index: int) -> str:
        """The scope of block ``index`` (``"group"`` or ``"block"``); a recipe mixes them across blocks."""
        return self.scope

    def prepare(self, model: nn.Module, adapter: Adapter) -> None:
        """A model-level step before calibration (e.g. a rotation of the residual stream); default: nothing."""

    def set_activation(self, act: ActSpec) -> None:
        """Receive the run's activation setting (only called when ``receives_act``)."""
        raise NotImplementedError

    def observe(self, group: Group) -> Any:
        """Register observations on ``group`` (``group.on_input`` ...); the return value reaches ``quantize``."""
        return None

    def quantize(self, group: Group, state: Any) -> list[LayerResult]:
        """Quantize ``group.linears`` after every calibration token has passed; one result per linear."""
        raise NotImplementedError

    def quantize_block(self, block: BlockGroup) -> list[LayerResult]:
        """Quantize a whole block at once (``scope = "block"``): one result per linear, in ``block.names`` order
        (the adapter's ``linear_names()``). ``block.inputs`` / ``block.targets`` are the calibration chunks and
        the float block's outputs on them; ``block.run`` replays the block with candidate weights."""
        raise NotImplementedError

    def reduce(self, state: Any, collective: Collective) -> Any:
        """The state of every rank's calibration windows, from this rank's ``state`` (``observe``'s, after the
        pass); called on every rank before ``quantize`` when several ranks run. Default: no statistics."""
        return state

    def wrap(self, group: Group, name: str, linear: nn.Module) -> nn.Module | None:
        """A module to run in place of the quantized ``linear`` for the rest of this block's propagation."""
        return None

    def describe(self) -> dict:
        """Method settings recorded in ``quantization.json``."""
        return asdict(self.options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls.Options))


def split_rows(stacked: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Undo ``torch.cat(weights)`` along the output dimension."""
    return list(torch.split(stacked, [w.shape[0] for w in weights], dim=0))
