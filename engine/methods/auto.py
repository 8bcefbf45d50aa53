"""``--method auto``: each input-sharing group of linears gets the method and bit width that an allocation under an
average-bit budget chose for it (``engine/auto_bits.py``), from scores measured on calibration data
(``engine/auto_plan.py``, which runs :class:`CandidateScorer` over the float model first).

:class:`Auto` applies a chosen allocation, held as a recipe dict (``AutoOptions.plan``, the format of ``--recipe``),
through the per-layer grid door (``Method.layer_grid``): each group's grid takes the chosen bits, and its solve is
the chosen method's (GPTQ with its defaults, or RTN). Without a plan, ``engine/api.py`` makes one first.

:class:`CandidateScorer` scores every candidate of every group by the Hessian-weighted error
``tr(dW H dW^T)`` (``H`` the group's mean ``2 x x^T``, ``dW`` the candidate's quantized minus float weights, the
linears' rows stacked): the summed squared error the candidate adds to the group's outputs per calibration token,
the quantity GPTQ minimises (Frantar et al. 2023, eq. 1; HAWQ-V3 and AutoScheme score layers by such second-order
errors). It writes the float weights back, so every block sees the float model's inputs: upstream quantization is
ignored, as in a per-layer sensitivity scan. It also records ``tr(W H W^T)``, the group's output energy, for the
relative scoring, and, given the loss's mean squared gradient ``f_n`` on every output ``n`` of every linear
(``auto_plan.output_fisher``), the loss-weighted error ``sum_n f_n (dW H dW^T)_nn / 2``: the second-order change of the
calibration loss under a diagonal Fisher of the outputs, with gradients and inputs taken as independent. BRECQ
(Li et al. 2021, arXiv:2102.05426, §3.2) weights its output reconstruction by the same squared gradients; here they
make the errors of different layers commensurable, which the plain output error is not (bench/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ...errors import TritonqError
from ..auto_bits import DEFAULT_CANDIDATES, Candidate, parse_candidates, recipe_scheme
from ..grid import GridSpec
from ..hessian import HessianAccumulator
from .base import LayerResult, Method
from .gptq import GPTQOptions, solve
from .rtn import round_to_nearest

if TYPE_CHECKING:
    from ..groups import Group

SCORINGS = ("absolute", "relative", "fisher")


@dataclass(frozen=True)
class AutoOptions:
    avg_bits: float = field(default=0.0, metadata={
        "help": "average bits per weight, scales and zeros included, that --method auto allocates (required)"})
    candidates: str = field(default=DEFAULT_CANDIDATES, metadata={
        "help": "METHOD:BITS schemes --method auto may give a group of linears, comma-separated (gptq, rtn)"})
    # fisher: the best of the three on held-out pydoc at 3.5 bits (bench/RESULTS.md, issue 22 item 3)
    scoring: str = field(default="fisher", metadata={
        "help": "how --method auto compares groups: tr(dW H dW^T) absolute, relative to tr(W H W^T), or each output "
                "row weighted by the loss's mean squared gradient on it (fisher)",
        "choices": SCORINGS, "const": "fisher"})
    # the chosen allocation as a recipe dict (engine/auto_bits.py); filled by the scoring pass, not a flag
    plan: dict | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        parse_candidates(self.candidates)  # an unknown candidate fails here, before anything loads
        if self.scoring not in SCORINGS:
            raise TritonqError(f"--scoring must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")


class Auto(Method):
    name = "auto"
    summary = "bits (and method) per group of linears under --avg-bits, chosen on calibration data (issue 22)"
    Options = AutoOptions

    def _scheme(self, name: str) -> dict | None:
        return None if self.options.plan is None else recipe_scheme(self.options.plan["recipe"], name)

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        chosen = self._scheme(name)
        return spec if chosen is None else dataclasses.replace(spec, bits=int(chosen["bits"]))

    def act_order_groups(self) -> str | None:
        return GPTQOptions().act_order

    def observe(self, group: Group) -> HessianAccumulator | None:
        if self._method(group) != "gptq":
            return None
        acc = HessianAccumulator(group.linears[0].in_features, group.device, group.collective)
        group.on_input(group.names[0], acc.add)
        return acc

    def _method(self, group: Group) -> str:
        chosen = self._scheme(group.full_names[0])
        if chosen is None:
            raise TritonqError("--method auto ran without an allocation; quantize() makes one (engine/auto_plan.py)")
        return chosen["method"]

    def quantize(self, group: Group, state: HessianAccumulator | None) -> list[LayerResult]:
        if self._method(group) == "rtn":
            return [round_to_nearest(lin.weight.data, group.spec, name)
                    for lin, name in zip(group.linears, group.full_names)]
        if state.tokens == 0:
            raise TritonqError(f"--method auto saw no calibration tokens for {group.label}; give calibration data")
        weights = [lin.weight.data for lin in group.linears]
        return solve(weights, state.take(), group.spec, group.full_names, GPTQOptions())

    def describe(self) -> dict:
        opts = self.options
        return {"avg_bits": opts.avg_bits, "candidates": opts.candidates, "scoring": opts.scoring,
                **({} if opts.plan is None else opts.plan)}


@dataclass
class GroupScores:
    names: list[str]
    shapes: list[tuple[int, int]]
    block: int
    errors: dict[str, float]  # candidate label -> tr(dW H dW^T)
    energy: float  # tr(W H W^T)
    loss_errors: dict[str, float] | None = None  # candidate label -> sum_n f_n (dW H dW^T)_nn / 2 (fisher)


class CandidateScorer(Method):
    """Scores every candidate on every group and leaves the weights float (module docstring); not registered."""

    name = "auto-score"
    summary = "the scoring pass of --method auto"

    def __init__(self, candidates: tuple[Candidate, ...], fisher: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.candidates = candidates
        self.fisher = fisher  # full linear name -> mean squared loss gradient per output [N]
        self.groups: list[GroupScores] = []

    def observe(self, group: Group) -> HessianAccumulator:
        acc = HessianAccumulator(group.linears[0].in_features, group.device, group.collective)
        group.on_input(group.names[0], acc.add)
        return acc

    def quantize(self, group: Group, state: HessianAccumulator) -> list[LayerResult]:
        if state.tokens == 0:
            raise TritonqError(f"--method auto saw no calibration tokens for {group.label}; give calibration data")
        hessian = state.take()
        weights = [lin.weight.data for lin in group.linears]
        w = torch.cat([x.float() for x in weights]).to(hessian.device)
        h64 = hessian.double()
        errors, loss_errors = {}, {}
        f = None if self.fisher is None else torch.cat([self.fisher[n] for n in group.full_names]).to(hessian.device)
        for cand in self.candidates:
            spec = dataclasses.replace(group.spec, bits=cand.bits)
            if cand.method == "gptq":
                results = solve(weights, hessian, spec, group.full_names, GPTQOptions())
            else:
                results = [round_to_nearest(x, spec, n) for x, n in zip(weights, group.full_names)]
            delta = torch.cat([r.weight for r in results]) - w
            errors[cand.label] = weighted_error(delta, h64)
            if f is not None:
                loss_errors[cand.label] = weighted_error(delta, h64, f.double()) / 2
        self.groups.append(GroupScores(list(group.full_names), [tuple(x.shape) for x in weights], group.index, errors,
                                       weighted_error(w, h64), loss_errors if f is not None else None))
        empty = torch.empty(0)
        return [LayerResult(x, empty, empty, empty) for x in weights]  # the float weights stay: float inputs next


def weighted_error(delta: torch.Tensor, hessian: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """``tr(delta H delta^T)`` in float64 (``delta`` [R, K], ``H`` [K, K]); ``rows`` [R] weights each row's term."""
    d = delta.double()
    per_row = ((d @ hessian) * d).sum(dim=1)
    return float(per_row.sum() if rows is None else (per_row * rows).sum())


def group_scores(groups: list[GroupScores], scoring: str) -> list[dict[str, float]]:
    """Each group's candidate scores under ``scoring``: the error itself, or relative to the output energy."""
    if scoring == "absolute":
        return [dict(g.errors) for g in groups]
    if scoring == "fisher":
        if any(g.loss_errors is None for g in groups):
            raise TritonqError("the fisher scoring needs the loss gradients of the scoring pass (auto_plan.py)")
        return [dict(g.loss_errors) for g in groups]
    return [{k: v / max(g.energy, 1e-30) for k, v in g.errors.items()} for g in groups]


def describe_scores(groups: list[GroupScores]) -> dict[str, Any]:
    """The scores as ``quantization.json`` records them: per group (its first linear's name) errors and energy."""
    def short(values: dict[str, float]) -> dict[str, float]:
        return {k: float(f"{v:.6g}") for k, v in values.items()}

    return {g.names[0]: {"errors": short(g.errors), "energy": float(f"{g.energy:.6g}"),
                         **({} if g.loss_errors is None else {"loss_errors": short(g.loss_errors)})} for g in groups}
