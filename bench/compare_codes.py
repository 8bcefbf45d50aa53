"""How far two ``--format fake`` outputs of the same model agree: integer codes, grids and fake weights.

Used to check that data-parallel calibration (``--nproc N``, ``engine/distributed.py``) gives the codes of one
process. A weight's code is ``round(w / scale) + zero`` of its group (``grid.codes_of``); a code counts as
identical when both outputs give the same integer *and* the same scale and zero (the same grid point).

    python -m tritonq.bench.compare_codes OUT_A OUT_B
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.grid import codes_of
from ..errors import TritonqError


@dataclass
class Agreement:
    weights: int  # quantized weights compared
    same_codes: int  # same integer code on the same grid point (scale and zero bitwise equal)
    same_weights: int  # fake-quantized float weights bitwise equal
    groups: int  # (row, group) grids compared
    same_grids: int  # scale and zero bitwise equal
    layers: int
    same_layers: int  # layers whose fake weights are bitwise equal

    @property
    def code_share(self) -> float:
        return self.same_codes / max(self.weights, 1)


def _read(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    params_file, weights = out / "quant_params.safetensors", {}
    if not params_file.is_file():
        raise TritonqError(f"{out} has no quant_params.safetensors; compare two '--format fake' outputs")
    for shard in sorted(out.glob("*.safetensors")):
        if shard.name != params_file.name:
            weights.update(load_file(shard))
    return weights, load_file(params_file)


def compare(a: str | Path, b: str | Path) -> Agreement:
    """Agreement of the quantized linears of two fake outputs (every linear of ``a`` must be in ``b``)."""
    (wa, pa), (wb, pb) = _read(Path(a)), _read(Path(b))
    layers = sorted(k[: -len(".scale")] for k in pa if k.endswith(".scale"))
    out = Agreement(0, 0, 0, 0, 0, len(layers), 0)
    for name in layers:
        bits = int(pa[f"{name}.grid"][0])
        grids = [(p[f"{name}.scale"], p[f"{name}.zero"], p[f"{name}.g_idx"]) for p in (pa, pb)]
        w = [ws[f"{name}.weight"].float() for ws in (wa, wb)]
        codes = [codes_of(wi, s, z, g, 2**bits - 1) for wi, (s, z, g) in zip(w, grids)]
        same_grid = (grids[0][0] == grids[1][0]) & (grids[0][1] == grids[1][1])  # [N, G]
        point = same_grid[:, grids[0][2].long()]  # [N, K]: the weight's grid is the same in both
        out.weights += codes[0].numel()
        out.same_codes += int(((codes[0] == codes[1]) & point).sum())
        out.same_weights += int((w[0] == w[1]).sum())
        out.groups += same_grid.numel()
        out.same_grids += int(same_grid.sum())
        out.same_layers += bool(torch.equal(w[0], w[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tritonq.bench.compare_codes OUT_A OUT_B", file=sys.stderr)
        return 2
    result = compare(*args)
    print(json.dumps({**asdict(result), "code_share": result.code_share}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
