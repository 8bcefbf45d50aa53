"""DH-AWQ (engine/methods/dh_awq.py): the property tests of ``../shared/docs/awq_family.md`` §8 on fresh random
weights and mean inputs, the Kneedle outliers on a synthetic vector, and a run on a tiny model."""

import pytest
import torch
import torch.nn as nn
from test_method_interface import _batches, _load
from test_pipeline import make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec, codes_of
from tritonq.engine.methods import registry
from tritonq.engine.methods.dh_awq import heuristic_quantize, kneedle_outliers
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.pipeline import quantize_blocks

SPEC = GridSpec(bits=4, group_size=32)


def _case(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    m = torch.randn(k, generator=gen) * 0.3
    m[:3] *= 40  # a few outlier channels of the mean input
    return w, m


def test_zero_cap_is_rtn():
    w, m = _case(24, 128, 0)
    out = heuristic_quantize(w, m, SPEC, max_flip_percent=0.0)
    assert torch.equal(out.result.weight, round_to_nearest(w, SPEC).weight)
    assert int(out.flips.sum()) == 0


@pytest.mark.parametrize("reference_cap", [False, True])
@pytest.mark.parametrize("percent", [0.01, 0.05, 0.3])
def test_flips_are_one_code_toward_the_other_neighbour_and_never_raise_the_row_error(reference_cap, percent):
    w, m = _case(40, 256, seed=int(percent * 100) + reference_cap)
    out = heuristic_quantize(w, m, SPEC, percent, reference_cap=reference_cap)
    rtn = round_to_nearest(w, SPEC)
    res = out.result
    codes = codes_of(res.weight, res.scale, res.zero, res.g_idx, SPEC.maxq).long()
    base = codes_of(rtn.weight, rtn.scale, rtn.zero, rtn.g_idx, SPEC.maxq).long()
    moved = codes != base
    assert ((codes - base).abs() <= 1).all()  # one code only
    sc = res.scale[:, res.g_idx.long()]
    unrounded = w / sc + res.zero[:, res.g_idx.long()]
    toward = torch.where(unrounded - base < 0, -1, 1)
    assert torch.equal((codes - base)[moved], toward[moved])  # toward u's other neighbour
    cap = int(percent * w.shape[1])
    assert (moved.sum(dim=1) <= cap).all() and torch.equal(moved.sum(dim=1), out.flips)
    outliers = kneedle_outliers(m.abs())
    assert outliers.any() and not moved[:, outliers].any()  # outlier channels never flip
    assert (out.error_after.abs() <= out.error_before.abs() * (1 + 1e-5) + 1e-7).all()
    assert moved.any() and (out.error_after.abs() < out.error_before.abs() * 0.999).any()  # it does something
    # the recomputed row error on the mean input matches the one reported
    e = ((w - res.weight) * m[None]).sum(dim=1)
    torch.testing.assert_close(e, out.error_after, rtol=1e-4, atol=1e-6)


def test_best_under_the_cap_is_never_worse_than_truncating():
    w, m = _case(64, 256, seed=7)
    ours = heuristic_quantize(w, m, SPEC, 0.02)
    ref = heuristic_quantize(w, m, SPEC, 0.02, reference_cap=True)
    assert (ours.error_after.abs() <= ref.error_after.abs() * (1 + 1e-5) + 1e-7).all()


def test_kneedle_finds_the_few_large_values():
    gen = torch.Generator().manual_seed(3)
    v = torch.rand(500, generator=gen) * 0.1
    big = torch.randperm(500, generator=gen)[:6]
    v[big] = 5 + torch.rand(6, generator=gen)
    mask = kneedle_outliers(v)
    assert set(torch.nonzero(mask).flatten().tolist()) == set(big.tolist())
    assert not kneedle_outliers(torch.ones(50)).any()  # a flat vector has no outliers


def test_dh_awq_runs_on_a_tiny_model_and_stays_on_the_grid(tmp_path):
    model = _load(make_family_model(tmp_path / "float", "llama"))
    spec = GridSpec(bits=3, group_size=32)
    with torch.no_grad():
        report = quantize_blocks(model, adapter_for(model.config), registry.make_method("dh-awq",
                                 {"max_flip_percent": 0.05}), spec, torch.device("cpu"), _batches(), progress=False)
    flips = 0
    for name, mod in model.named_modules():
        if name in report.layers:
            r = report.layers[name]
            codes = codes_of(mod.weight.data, r.scale, r.zero, r.g_idx, spec.maxq)
            idx = r.g_idx.long()
            assert torch.equal(r.scale[:, idx] * (codes.float() - r.zero[:, idx]), mod.weight.data), name
            flips += r.info["flips"]
    assert flips > 0 and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
