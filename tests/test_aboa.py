"""A-BoA (engine/aboa.py) against ``../shared/docs/boa.md`` §7 and ``awq_family.md`` §7, on fresh random inputs:

* folding leaves the float64 model unchanged (Llama with and without GQA, OPT; AWQ's scales and the salient
  rule), and under GQA the v -> o scale is folded, tied across the query heads of each KV group;
* the candidates (tied across heads, and the salient rule) equal float64 transcriptions, and the tied o_proj
  search returns the float64 brute-force argmin;
* BoA's statistics transformed to the scaled input equal those observed on the scaled block: A-BoA equals BoA
  run on the model with A-BoA's scales folded in beforehand;
* with unit scales A-BoA is BoA bit for bit; the CLI flags reach the options; bad options are clear errors.
"""

import math

import pytest
import torch
import torch.nn as nn
from test_awq import _fq64, _outlier_inputs
from test_method_interface import _batches, _load
from test_pipeline import make_family_model
from tritonq.bench.aboa_fold import FoldOnlyABoA
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec
from tritonq.engine.groups import Group
from tritonq.engine.methods import aboa, awq, registry
from tritonq.engine.methods.smoothquant import fold_gqa_value
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError

SPEC = GridSpec(bits=3, group_size=16)


def _model(tmp_path, family, kv_heads=None, dtype=torch.float64):
    """A tiny model of ``family`` with outlier channels on the attention input, so the scales are far from 1."""
    from transformers import AutoModelForCausalLM

    model = _load(make_family_model(tmp_path / "float", family))
    if kv_heads is not None:
        model.config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).eval()
    model = model.to(dtype)
    with torch.no_grad():
        for layer in adapter_for(model.config).block_list(model):
            norm = layer.self_attn_layer_norm if family == "opt" else layer.input_layernorm
            norm.weight[:3] *= 20.0
    return model


@pytest.mark.parametrize("family,kv_heads,options", [
    ("llama", None, {}), ("llama", 4, {}), ("opt", None, {}),
    ("llama", None, {"awq_salient_ratio": 0.1, "awq_alpha": 0.5}), ("llama", None, {"awq_version": 2}),
])
def test_folded_float64_model_equals_the_original(tmp_path, family, kv_heads, options):
    model = _model(tmp_path, family, kv_heads)
    method = FoldOnlyABoA(aboa.ABoAOptions(**options))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        quantize_blocks(model, adapter_for(model.config), method, SPEC, torch.device("cpu"), _batches(n=4),
                        progress=False)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)
    smooths = {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"}
    if family == "opt":
        smooths = {"self_attn_layer_norm", "final_layer_norm", "self_attn.v_proj"}
    layers = model.config.num_hidden_layers
    assert set(method.scales) == {f"{i}.{s}" for i in range(layers) for s in smooths}  # GQA v -> o included
    prefix = "model.decoder.layers.0." if family == "opt" else "model.layers.0."
    params = dict(model.named_parameters())
    for s in smooths:
        assert not torch.equal(before[prefix + s + ".weight"], params[prefix + s + ".weight"]), s
    attn = method.scales["0.input_layernorm" if family != "opt" else "0.self_attn_layer_norm"]
    assert attn.max() / attn.min() > 2  # the outliers moved the scales far from 1: the test can fail
    if kv_heads is None and family != "opt":  # GQA (2 of 4 heads): the heads of a KV group share each scale
        v = method.scales["0.self_attn.v_proj"].reshape(2, 2, 16)
        assert torch.equal(v[:, 0], v[:, 1]) and (v - 1).abs().max() > 1e-3


def test_tied_candidates_match_float64():
    """GQA v -> o: per value channel, the mean over the query heads of its group of ``mean|x|`` and of the
    normalised weight mean, AWQ's formula and normalisation, then repeated over the heads."""
    kv, rep, dh, n = 2, 3, 8, 20
    k = kv * rep * dh
    x = _outlier_inputs(200, k, seed=3)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    obs = aboa.TiedPairObserver(adapter_for(_cfg()).value_pair, None, 0, rep, dh)
    obs.add_stat(x[:120].float())
    obs.add_stat(x[120:].float())
    method = aboa.ABoA(aboa.ABoAOptions(n_grid=10))
    cands = method.candidates(obs, [w.float()], SPEC)
    assert cands.shape == (10, k)
    g = SPEC.group_size
    wn = (w.abs().reshape(n, k // g, g) / (w.abs().reshape(n, k // g, g).amax(2, keepdim=True) + 1e-6)).reshape(n, k)
    x_kv = x.abs().mean(0).reshape(kv, rep, dh).mean(1).reshape(-1)
    w_kv = wn.mean(0).reshape(kv, rep, dh).mean(1).reshape(-1)
    for i in range(10):
        a = i / 10
        s = (x_kv**a / (w_kv ** (1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / math.sqrt(s.max() * s.min())
        full = s.reshape(kv, 1, dh).expand(kv, rep, dh).reshape(-1)
        torch.testing.assert_close(cands[i].double(), full, rtol=1e-5, atol=0)
    # the search on o_proj's output over these tied candidates picks the float64 brute-force argmin
    best, losses = awq.search_linear_scale(w.float(), x.float(), cands, SPEC)
    expected = torch.tensor([float((x @ (_fq64(w * s, SPEC) / s - w).t()).pow(2).mean()) for s in cands.double()])
    torch.testing.assert_close(losses, expected, rtol=1e-2, atol=0)
    order = torch.sort(expected).values
    assert order[1] - order[0] > 1e-3 * order[0] and best == int(torch.argmin(expected)) and best > 0


def _cfg():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=8)


def test_salient_rule_matches_float64():
    k, n = 64, 12
    x = _outlier_inputs(100, k, seed=5)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    pair = adapter_for(_cfg()).input_pairs[0]
    obs = aboa.TiedPairObserver(pair, "self_attn", 0)
    obs.add_stat(x[:50].float())
    obs.add_stat(x[50:].float())
    method = aboa.ABoA(aboa.ABoAOptions(awq_salient_ratio=0.1, n_grid=4))
    cands = method.candidates(obs, [w[:5].float(), w[5:].float()], SPEC)
    a, m = x.abs().amax(0), w.abs().amax(0)
    top = set(torch.topk(a, 7).indices.tolist())  # ceil(0.1 * 64)
    for i in range(4):
        r = i / 4
        expected = torch.tensor([min(max(a[j] ** r / m[j] ** (1 - r), 0.1), 10.0) if j in top else 1.0
                                 for j in range(k)], dtype=torch.float64)
        torch.testing.assert_close(cands[i].double(), expected, rtol=1e-6, atol=0)
    assert (cands[1:] != 1).sum(dim=1).tolist() == [7, 7, 7]  # only the salient channels move
    fixed = aboa.ABoA(aboa.ABoAOptions(awq_salient_ratio=0.1, awq_alpha=0.5)).candidates(obs, [w.float()], SPEC)
    torch.testing.assert_close(fixed[0], cands[2])  # a fixed ratio is the one candidate


def _quantized(model, method):
    with torch.no_grad():
        quantize_blocks(model, adapter_for(model.config), method, SPEC, torch.device("cpu"), _batches(n=4),
                        progress=False)
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_unit_scales_give_boa_bit_for_bit(tmp_path, family):
    boa_options = {"block_v": True, "act_order_col": True, "act_order_row": True, "qparam": "hessian"}
    boa = _quantized(_model(tmp_path, family, dtype=torch.float32), registry.make_method("boa", boa_options))
    unit = registry.make_method("aboa", {**boa_options, "n_grid": 1, "awq_version": 2})  # ratio 0: s = 1
    aboa_q = _quantized(_model(tmp_path, family, dtype=torch.float32), unit)
    assert all(torch.equal(s, torch.ones_like(s)) for s in unit.scales.values()) and unit.scales
    for name in boa:
        assert torch.equal(aboa_q[name], boa[name]), name


def _prefold(model, scales):
    """Fold A-BoA's recorded scales into a float model, producer by producer (the GQA v -> o pair tied)."""
    adapter = adapter_for(model.config)
    geo = adapter.geometry(model.config)
    for i, block in enumerate(adapter.block_list(model)):
        group = Group(block, i, (), adapter, model.config, SPEC, torch.device("cpu"), set())
        for pair in (*adapter.input_pairs, adapter.value_pair):
            s = scales[f"{i}.{pair.smooth}"].to(next(block.parameters()).dtype)
            if pair is adapter.value_pair and geo.kv_heads != geo.heads:
                rep = geo.heads // geo.kv_heads
                fold_gqa_value(group, pair, s.reshape(-1, rep, geo.head_dim)[:, 0].reshape(-1), rep, geo.head_dim)
            else:
                group.fold(pair, s)


def test_statistics_of_the_scaled_block_equal_the_transformed_ones(tmp_path):
    """A-BoA observes q/k/v and gate/up on ``x`` and rescales BoA's statistics to ``x / s``; BoA run on the model
    with the same scales folded beforehand observes ``x / s`` itself: the weights must agree."""
    options = {"block_v": True, "act_order_col": True}
    method = registry.make_method("aboa", {**options, "n_grid": 5})
    got = _quantized(_model(tmp_path, "llama"), method)
    folded = _model(tmp_path, "llama")
    with torch.no_grad():
        _prefold(folded, method.scales)
    expected = _quantized(folded, registry.make_method("boa", options))
    assert len(method.scales) == 8
    for name in expected:
        if name.endswith("lm_head"):
            continue
        same = torch.isclose(got[name], expected[name], rtol=1e-6, atol=1e-9)
        assert same.float().mean() > 0.999, (name, same.float().mean())  # fp32 solves: a rare rounding flip
    # without the transformation (statistics of x, weights of W s) the result would differ widely
    raw = registry.make_method("aboa", {**options, "n_grid": 5})
    raw.finish = lambda group, state, input_scale: raw.boa.quantize(group, state.own_input)
    untransformed = _quantized(_model(tmp_path, "llama"), raw)
    q = "model.layers.0.self_attn.q_proj"
    assert torch.isclose(untransformed[q], expected[q], rtol=1e-6, atol=1e-9).float().mean() < 0.99


def test_cli_flags_reach_the_options():
    from tritonq.cli import build_parser
    from tritonq.commands import method_options_from_args

    args = build_parser().parse_args(
        ["quantize", "--method", "aboa", "--output", "/tmp/x", "--awq-salient-ratio", "0.01", "--awq-alpha", "0.5",
         "--block-v", "--act-order-col", "--act-order-row", "--qparam", "hessian", "--awq-version", "2",
         "--n-grid", "10", "--damp", "0.05", "--search-tokens", "0"])
    opts = registry.make_method(args.method, method_options_from_args(args)).options
    assert (opts.awq_salient_ratio, opts.awq_alpha, opts.block_v, opts.act_order_col, opts.act_order_row,
            opts.qparam, opts.awq_version, opts.n_grid, opts.damp, opts.search_tokens) == \
        (0.01, 0.5, True, True, True, "hessian", 2, 10, 0.05, 0)
    method = registry.make_method(args.method, method_options_from_args(args))
    assert method.boa.options.block_v and method.boa.options.damp == 0.05
    bad = build_parser().parse_args(["quantize", "--method", "aboa", "--output", "/tmp/x", "--clip-sym"])
    with pytest.raises(TritonqError, match="does not apply to --method aboa"):
        method_options_from_args(bad)


def test_bad_options_are_clear_errors():
    with pytest.raises(TritonqError, match="--awq-salient-ratio must be in"):
        aboa.ABoAOptions(awq_salient_ratio=1.5)
    with pytest.raises(TritonqError, match="--awq-alpha must be in"):
        aboa.ABoAOptions(awq_alpha=2.0)
    with pytest.raises(TritonqError, match="--qparam must be one of"):
        aboa.ABoAOptions(qparam="awq")
    with pytest.raises(TritonqError, match="--n-grid"):
        aboa.ABoAOptions(n_grid=0)
