"""The shared grid against brute force on fresh random inputs (float64 where it matters)."""

import itertools

import pytest
import torch
from tritonq.engine.grid import GridSpec, codes_of, default_g_idx, dequantize, fake_quantize, fit_groups, fit_rows
from tritonq.errors import TritonqError


@pytest.mark.parametrize("bits,sym", list(itertools.product([2, 3, 4, 8], [False, True])))
def test_fake_quant_is_nearest_grid_point(bits, sym):
    torch.manual_seed(bits * 10 + sym)
    spec = GridSpec(bits=bits, group_size=-1, sym=sym)
    w = torch.randn(16, 40) * torch.rand(16, 1) * 3
    scale, zero = fit_rows(w, spec)
    q = fake_quantize(w, scale[:, None], zero[:, None], spec.maxq)
    # brute force over every code of the row's grid, in float64
    codes = torch.arange(spec.maxq + 1, dtype=torch.float64)
    grid = scale.double()[:, None] * (codes[None, :] - zero.double()[:, None])  # [rows, levels]
    dist = (w.double()[:, :, None] - grid[:, None, :]).abs()
    nearest = grid.gather(1, dist.argmin(dim=2))
    # ties can round either way; compare distances rather than values
    assert torch.allclose((q.double() - w.double()).abs(), (nearest - w.double()).abs(), atol=1e-6)


def test_codes_in_range_and_symmetric_zero_exact():
    torch.manual_seed(1)
    for bits in (2, 3, 4, 5, 8):
        spec = GridSpec(bits=bits, group_size=8, sym=True)
        w = torch.randn(6, 32)
        scale, zero = fit_groups(w, spec)
        assert torch.all(zero == 2 ** (bits - 1))
        idx = default_g_idx(32, spec).long()
        assert torch.all(fake_quantize(torch.zeros(6, 32), scale[:, idx], zero[:, idx], spec.maxq) == 0)
        codes = codes_of(fake_quantize(w, scale[:, idx], zero[:, idx], spec.maxq), scale, zero, default_g_idx(32, spec),
                         spec.maxq)
        assert int(codes.max()) <= spec.maxq


@pytest.mark.parametrize("value", [0.37, -2.5, 0.0, 1e-3])
def test_constant_group_round_trips(value):
    spec = GridSpec(bits=4, group_size=16, sym=False)
    w = torch.full((3, 32), value)
    scale, zero = fit_groups(w, spec)
    idx = default_g_idx(32, spec).long()
    q = fake_quantize(w, scale[:, idx], zero[:, idx], spec.maxq)
    assert torch.allclose(q, w, rtol=1e-3, atol=1e-7)


def test_asymmetric_grid_spans_group_range():
    torch.manual_seed(2)
    spec = GridSpec(bits=3, group_size=16)
    w = torch.randn(5, 64)
    scale, zero = fit_groups(w, spec)
    idx = default_g_idx(64, spec).long()
    err = (fake_quantize(w, scale[:, idx], zero[:, idx], spec.maxq) - w).abs()
    assert torch.all(err <= scale[:, idx] / 2 * (1 + 1e-3) + 1e-6)  # nothing clipped: min-max range


def test_scales_are_fp16_representable_and_dequantize_round_trip():
    torch.manual_seed(3)
    spec = GridSpec(bits=4, group_size=32)
    w = torch.randn(8, 96)
    scale, zero = fit_groups(w, spec)
    assert torch.equal(scale, scale.half().float())
    g_idx = default_g_idx(96, spec)
    idx = g_idx.long()
    q = fake_quantize(w, scale[:, idx], zero[:, idx], spec.maxq)
    assert torch.equal(dequantize(codes_of(q, scale, zero, g_idx, spec.maxq), scale, zero, g_idx), q)


def test_mse_shrink_never_worse_in_its_norm():
    torch.manual_seed(4)
    w = torch.randn(32, 64) ** 3  # heavy tails: clipping pays off
    plain = GridSpec(bits=3, group_size=-1)
    mse = GridSpec(bits=3, group_size=-1, mse=True)
    s0, z0 = fit_rows(w, plain)
    s1, z1 = fit_rows(w, mse)
    e0 = (fake_quantize(w, s0[:, None], z0[:, None], 7) - w).abs().pow(2.4).sum(1)
    e1 = (fake_quantize(w, s1[:, None], z1[:, None], 7) - w).abs().pow(2.4).sum(1)
    assert torch.all(e1 <= e0 + 1e-5)
    assert (e1 < e0 - 1e-3).any()


def test_bad_specs_have_clear_errors():
    with pytest.raises(TritonqError, match="bits must be an integer from 2 to 8"):
        GridSpec(bits=9)
    with pytest.raises(TritonqError, match="group size"):
        GridSpec(group_size=0)
    with pytest.raises(TritonqError, match="does not divide the input width 576 of model.layers.0.q"):
        GridSpec(group_size=128).groups_for(576, "model.layers.0.q")


# ------------------------------------------------------------------------------ the one grid rule


def _ranges(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-row ranges over six decades (the smallest hit MIN_SCALE), some all-positive or all-negative."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 24, generator=gen) * torch.logspace(-7, 1, rows)[:, None]
    w[::5] = w[::5].abs()
    w[1::5] = -w[1::5].abs()
    return w.amin(dim=1), w.amax(dim=1)


@pytest.mark.parametrize("bits,sym", list(itertools.product([2, 3, 4, 8], [False, True])))
def test_host_fit_is_the_shared_rule_and_matches_float64(bits, sym):
    from tritonq.kernels.grid_rule import MIN_SCALE, minmax_scale_zero

    maxq = 2**bits - 1
    lo, hi = _ranges(60, seed=bits + 10 * sym)
    scale, zero = minmax_scale_zero(lo, hi, maxq, sym)
    # the host fit (no shrink search) is this rule, bit for bit
    w = torch.stack([lo, hi, torch.zeros_like(lo)], dim=1)
    s_host, z_host = fit_rows(w, GridSpec(bits=bits, group_size=-1, sym=sym))
    assert torch.equal(s_host, scale) and torch.equal(z_host, zero)
    # and the rule is the documented formula, evaluated in float64 (the scale then rounded to fp16)
    lo64, hi64 = lo.double().clamp(max=0), hi.double().clamp(min=0)
    s64 = (2 * torch.maximum(-lo64, hi64) if sym else hi64 - lo64) / maxq
    s64 = s64.clamp(min=MIN_SCALE).half().double()
    # fp32 arithmetic before the fp16 rounding moves a scale by at most one fp16 step
    assert torch.all((scale.double() - s64).abs() <= s64 * 2.0**-10)
    assert (scale == MIN_SCALE).any() and (scale > MIN_SCALE).any()  # both regimes are exercised
    if sym:
        assert torch.all(zero == 2 ** (bits - 1))
    else:
        z64 = torch.clamp(torch.round(-lo64 / scale.double()), 0, maxq)
        assert torch.all((zero.double() - z64).abs() <= 1)  # a tie may round the other way in fp32
        assert (zero == z64).float().mean() > 0.95


def _assignments(path, name: str) -> list[int]:
    import ast

    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, (ast.Assign, ast.AnnAssign))
            and any(isinstance(t, ast.Name) and t.id == name
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]


def test_min_scale_is_defined_once():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {str(p.relative_to(root)): lines for p in sorted(root.rglob("*.py"))
             if ".venv" not in p.parts and "tests" not in p.parts and (lines := _assignments(p, "MIN_SCALE"))}
    assert list(found) == ["kernels/grid_rule.py"], f"MIN_SCALE assigned in {found}; import it from kernels.grid_rule"
    assert len(found["kernels/grid_rule.py"]) == 1


def test_min_scale_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("MIN_SCALE = 2.0**-14\nx: float = 1\nMIN_SCALE: float = 1e-5\n")
    assert _assignments(bad, "MIN_SCALE") == [1, 3]
