"""Bits per linear under an average-bit budget (``--method auto --avg-bits B``, issue 22 item 3): the candidates, the
honest bit count, the allocation, and the chosen allocation written as a recipe.

Each input-sharing group of linears (q/k/v, gate/up, o, down: the pipeline solves them on one Hessian and one grid,
``pipeline.group_grid``) gets one candidate ``(method, bits)``, scored on calibration data (``auto_plan.py``).
The allocation minimises the summed score subject to

    sum over linears of the bits they store  <=  B * (number of weights)

where a linear ``[N, K]`` on a grid of ``b`` bits and group ``g`` stores ``N K b`` code bits plus, per row and group,
a 16-bit scale and (asymmetric only) a ``b``-bit zero point: ``b + (16 + b) / g`` bits per weight asymmetric,
``b + 16 / g`` symmetric. That is the compressed-tensors layout (fp16 ``weight_scale``, ``weight_zero_point`` packed
at ``b`` bits, none when symmetric); GPTQ's ``qzeros`` are packed at ``b`` bits too but are stored even when
symmetric, so a symmetric GPTQ checkpoint holds ``b / g`` more bits per weight than counted here.

The solve is an exact multiple-choice knapsack (a dynamic programme over the total cost): costs are whole numbers of
bits, divided by their greatest common divisor; when that leaves more than ``MAX_CELLS`` cells, costs are rounded
*up* to a coarser unit, so the budget always holds and the result is within one unit per group of the optimum.
The candidate set is small (about 120 groups x 3 candidates for SmolLM2), so the programme is instant.

The result is a recipe dict in the format of ``--recipe`` (issue 22 item 2): ``{"default": {...}, "rules": [{"match":
"^model\\.layers\\.3\\.mlp\\.down_proj$", "method": ..., "bits": ..., "group_size": ..., "sym": ...}, ...]}``, one
anchored rule per linear, first match wins.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import TritonqError

CANDIDATE_METHODS = ("gptq", "rtn")
DEFAULT_CANDIDATES = "gptq:2,gptq:3,gptq:4"
MAX_CELLS = 1 << 20  # the programme's width: an int8 choice per group and cell (120 MB for 120 groups at most)
SCALE_BITS = 16  # fp16 scales in every packed format


@dataclass(frozen=True)
class Candidate:
    """One scheme a group may take: a method and a bit width (the group size and symmetry are the run's)."""

    method: str
    bits: int

    @property
    def label(self) -> str:
        return f"{self.method}:{self.bits}"


def parse_candidates(text: str) -> tuple[Candidate, ...]:
    """``"gptq:3,gptq:4,rtn:4"`` -> candidates, in order, duplicates refused; one-line errors name the fix."""
    out: list[Candidate] = []
    for item in (s.strip() for s in str(text).split(",")):
        method, sep, bits = item.partition(":")
        if not sep or method not in CANDIDATE_METHODS or not bits.isdigit() or not 2 <= int(bits) <= 8:
            raise TritonqError(f"unknown candidate {item!r} in --candidates; write METHOD:BITS with METHOD one of "
                               f"{', '.join(CANDIDATE_METHODS)} and BITS 2..8, comma-separated "
                               f"(e.g. {DEFAULT_CANDIDATES})")
        cand = Candidate(method, int(bits))
        if cand in out:
            raise TritonqError(f"candidate {cand.label} is listed twice in --candidates; list each once")
        out.append(cand)
    return tuple(out)


def stored_bits(rows: int, cols: int, bits: int, group_size: int, sym: bool) -> int:
    """Bits a ``[rows, cols]`` linear stores on its grid: codes, fp16 scales and (asymmetric) ``bits``-bit zeros."""
    groups = 1 if group_size == -1 else cols // group_size
    return rows * cols * bits + rows * groups * (SCALE_BITS + (0 if sym else bits))


def bits_per_weight(bits: int, group_size: int, sym: bool, cols: int) -> float:
    """:func:`stored_bits` per weight of a linear with ``cols`` inputs."""
    return stored_bits(1, cols, bits, group_size, sym) / cols


def check_budget(avg_bits: float, candidates: tuple[Candidate, ...], group_size: int, sym: bool,
                 widths: list[int]) -> None:
    """A budget the candidates cannot meet (every linear at its cheapest) or cannot use (every one at its richest)
    is refused; ``widths``: the linears' input widths (they matter per channel only)."""
    cheapest = max(bits_per_weight(min(c.bits for c in candidates), group_size, sym, k) for k in widths)
    richest = min(bits_per_weight(max(c.bits for c in candidates), group_size, sym, k) for k in widths)
    if not math.isfinite(avg_bits) or avg_bits < cheapest:
        raise TritonqError(f"--avg-bits {avg_bits} is below the cheapest candidate ({cheapest:.4g} bits per weight "
                           "with scales and zeros); raise it or add a narrower candidate")
    if avg_bits > richest:
        raise TritonqError(f"--avg-bits {avg_bits} is above the richest candidate ({richest:.4g} bits per weight "
                           "with scales and zeros); lower it or add a wider candidate")


@dataclass
class GroupOption:
    """One input-sharing group of linears and what each candidate would cost and score on it."""

    names: list[str]  # full names of the group's linears
    shapes: list[tuple[int, int]]  # [N, K] of each
    scores: dict[str, float]  # candidate label -> score (lower is better)

    def weights(self) -> int:
        return sum(n * k for n, k in self.shapes)

    def cost(self, cand: Candidate, group_size: int, sym: bool) -> int:
        return sum(stored_bits(n, k, cand.bits, group_size, sym) for n, k in self.shapes)


@dataclass
class Allocation:
    choices: list[Candidate]  # one per group, in order
    avg_bits: float  # achieved, scales and zeros included
    score: float  # summed score of the choices


def allocate(groups: list[GroupOption], candidates: tuple[Candidate, ...], avg_bits: float, group_size: int,
             sym: bool) -> Allocation:
    """The candidate per group that minimises the summed score with average stored bits <= ``avg_bits``
    (module docstring: the exact programme, or costs rounded up when the table would be too wide)."""
    total_weights = sum(g.weights() for g in groups)
    check_budget(avg_bits, candidates, group_size, sym, [k for g in groups for _, k in g.shapes])
    budget = math.floor(avg_bits * total_weights + 1e-9 * total_weights)  # bits; the float product rounded down
    raw = np.array([[g.cost(c, group_size, sym) for c in candidates] for g in groups], dtype=np.int64)
    scores = np.array([[g.scores[c.label] for c in candidates] for g in groups], dtype=np.float64)
    unit = reduce(math.gcd, raw.ravel().tolist())
    unit = max(unit, -(-budget // MAX_CELLS))
    cost = -(-raw // unit)  # rounded up: the budget holds whatever the unit
    cap = budget // unit
    if int(cost.min(axis=1).sum()) > cap:  # only possible when costs were rounded up
        raise TritonqError(f"--avg-bits {avg_bits} leaves no room once costs are rounded to {unit} bits; raise it")
    # best[x]: least summed score of the groups so far with cost <= x
    best = np.zeros(cap + 1)
    picks = np.zeros((len(groups), cap + 1), dtype=np.int8)
    for i in range(len(groups)):
        nxt = np.full(cap + 1, np.inf)
        for j in range(len(candidates)):
            c = int(cost[i, j])
            if c > cap:
                continue
            trial = np.full(cap + 1, np.inf)
            trial[c:] = best[: cap + 1 - c] + scores[i, j]
            better = trial < nxt
            nxt[better] = trial[better]
            picks[i, better] = j
        best = nxt
    choices: list[Candidate] = []
    x = cap
    for i in range(len(groups) - 1, -1, -1):
        j = int(picks[i, x])
        choices.append(candidates[j])
        x -= int(cost[i, j])
    choices.reverse()
    spent = sum(g.cost(c, group_size, sym) for g, c in zip(groups, choices))
    total = float(sum(g.scores[c.label] for g, c in zip(groups, choices)))
    return Allocation(choices, spent / total_weights, total)


def exact_name(name: str) -> str:
    """The anchored regex of one full linear name (``^model\\.layers\\.3\\.mlp\\.down_proj$``)."""
    return f"^{re.escape(name)}$"


def scheme(cand: Candidate, group_size: int, sym: bool) -> dict:
    return {"method": cand.method, "bits": cand.bits, "group_size": group_size, "sym": sym}


def allocation_recipe(groups: list[GroupOption], choices: list[Candidate], group_size: int, sym: bool) -> dict:
    """The recipe of ``--recipe`` that replays ``choices``: one anchored rule per linear; the default (reached by no
    linear of the run) is the most frequent choice."""
    counts: dict[Candidate, int] = {}
    for c in choices:
        counts[c] = counts.get(c, 0) + 1
    default = max(counts, key=lambda c: (counts[c], c.bits))
    rules = [{"match": exact_name(name), **scheme(c, group_size, sym)}
             for g, c in zip(groups, choices) for name in g.names]
    return {"default": scheme(default, group_size, sym), "rules": rules}


def recipe_scheme(recipe: dict, name: str) -> dict:
    """The scheme a recipe gives linear ``name``: the first rule whose ``match`` is found in it, else the default."""
    for rule in recipe.get("rules", []):
        if re.search(rule["match"], name):
            return {k: v for k, v in rule.items() if k != "match"}
    return dict(recipe["default"])


def heuristic_choices(blocks: list[int], low: Candidate, high: Candidate, edge: int) -> list[Candidate]:
    """The "first and last ``edge`` blocks at ``high``, the rest at ``low``" baseline, per group's block index."""
    last = max(blocks)
    return [high if b < edge or b > last - edge else low for b in blocks]
