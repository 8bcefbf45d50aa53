"""AWQ (engine/methods/awq.py, awq_scale.py, awq_clip.py) against float64 transcriptions of
``../shared/docs/awq_family.md`` §3, on fresh random
inputs with outlier channels (so the search has something to find).

* the scale formula and its normalisation against a float64 transcription;
* the linear and the module searches return the float64 brute-force argmin, with losses to 1e-4 relative
  (fp32 against fp64 sums; the cases are built so that the best loss beats the runner-up by far more);
* the clip search against a float64 token-space loop over the same candidates; the error never grows;
* the folded float64 model equals the original (1e-10), for GQA (v -> o skipped) and MHA (v -> o folded);
* ratio 0 without clip is RTN exactly, and AWQ+GPTQ with ratio 0 is GPTQ exactly;
* an AWQ model packs into every format and loads back through ``QuantLinear`` with the fake model's logits.
"""

import math

import pytest
import torch
import torch.nn as nn
from test_method_interface import _batches, _load
from test_pipeline import make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec, fake_quantize_groups
from tritonq.engine.methods import awq, awq_clip, awq_observe, awq_scale, registry
from tritonq.engine.methods.base import LayerResult
from tritonq.engine.methods.gptq import GPTQOptions
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError

SPEC = GridSpec(bits=3, group_size=16)
LOSS_RTOL = 1e-4


def _assert_losses_close(got, expected):
    """fp32 against fp64: equal to 1e-4 relative, except where one weight lands on the other side of a
    rounding midpoint in one of the two precisions (at most one candidate in ten, within 1%)."""
    rel = (got.double() - expected).abs() / expected
    assert (rel < LOSS_RTOL).float().mean() >= 0.9 and (rel < 1e-2).all(), rel


def _fq64(w, spec):
    """Float64 fake quantization on tritonq's grid (zero in range, fp16 scales), per group."""
    n, k = w.shape
    g = spec.effective_group(k)
    x = w.reshape(n, k // g, g)
    lo = x.amin(dim=2, keepdim=True).clamp(max=0)
    hi = x.amax(dim=2, keepdim=True).clamp(min=0)
    maxq = spec.maxq
    if spec.sym:
        scale = 2 * torch.maximum(-lo, hi) / maxq
    else:
        scale = (hi - lo) / maxq
    scale = scale.clamp(min=2.0**-14).to(torch.float16).double()
    zero = torch.full_like(scale, (maxq + 1) // 2) if spec.sym else torch.clamp(torch.round(-lo / scale), 0, maxq)
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(n, k)


def _scales64(x_mean, w_mean, ratio):
    s = x_mean**ratio if w_mean is None else x_mean**ratio / (w_mean ** (1 - ratio) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / math.sqrt(s.max() * s.min())


def _outlier_inputs(t, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen, dtype=torch.float64)
    x[:, : k // 8] *= 12.0  # salient channels
    return x


def test_candidate_scales_match_float64():
    torch.manual_seed(0)
    k = 48
    x_mean = torch.rand(k, dtype=torch.float64) * 3 + 0.01
    w = torch.randn(20, k, dtype=torch.float64)
    w_mean64 = (w.abs().reshape(20, 3, 16) / (w.abs().reshape(20, 3, 16).amax(2, keepdim=True) + 1e-6)).reshape(20, k)
    w_mean64 = w_mean64.mean(0)
    w_mean = awq_scale.weight_mean([w[:8].float(), w[8:].float()], SPEC)
    torch.testing.assert_close(w_mean.double(), w_mean64, rtol=1e-6, atol=0)
    ratios = awq_scale.grid_ratios(20)
    assert ratios[0] == 0 and abs(ratios[-1] - 0.95) < 1e-12 and len(ratios) == 20
    for duo in (True, False):
        cands = awq_scale.candidate_scales(x_mean.float(), w_mean if duo else None, ratios)
        for i, r in enumerate(ratios.tolist()):
            expected = _scales64(x_mean, w_mean.double() if duo else None, r)
            torch.testing.assert_close(cands[i].double(), expected, rtol=1e-5, atol=0)
        if not duo:
            assert torch.equal(cands[0], torch.ones(k))  # ratio 0 is RTN (under duo scaling it is 1 / w)
        assert (cands > 0).all() and torch.isfinite(cands).all()


def _linear_losses64(w, x, cands, spec):
    out = []
    for s in cands.double():
        e = _fq64(w * s, spec) / s - w
        out.append(float((x @ e.t()).pow(2).mean()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("sym", [False, True])
def test_linear_search_picks_the_float64_argmin(sym):
    spec = GridSpec(bits=3, group_size=16, sym=sym)
    k, n = 64, 40
    x = _outlier_inputs(300, k, seed=1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cands = awq_scale.candidate_scales(x.abs().mean(0).float(), awq_scale.weight_mean([w.float()], spec),
                                       awq_scale.grid_ratios(20))
    best, losses = awq_scale.search_linear_scale(w.float(), x.float(), cands, spec)
    expected = _linear_losses64(w, x, cands, spec)
    _assert_losses_close(losses, expected)
    order = torch.sort(expected).values
    assert order[1] - order[0] > 10 * LOSS_RTOL * order[0]  # a clear winner: the comparison can fail
    assert best == int(torch.argmin(expected)) and best > 0  # the outliers make a non-trivial ratio win


class TinyMLP(nn.Module):
    def __init__(self, k, h, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj = nn.Linear(k, h, bias=False), nn.Linear(k, h, bias=False)
        self.down_proj = nn.Linear(h, k, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def test_module_search_picks_the_float64_argmin():
    k, h = 32, 48
    mlp = TinyMLP(k, h, seed=3)
    x = _outlier_inputs(256, k, seed=4)
    calls = [((x[:128].float(),), {}), ((x[128:].float(),), {})]
    weights = [mlp.gate_proj.weight.data, mlp.up_proj.weight.data]
    cands = awq_scale.candidate_scales(x.abs().mean(0).float(), awq_scale.weight_mean(weights, SPEC),
                                       awq_scale.grid_ratios(20))
    before = [w.clone() for w in weights]
    best, losses = awq_scale.search_module_scale(mlp, [mlp.gate_proj, mlp.up_proj], calls, cands, SPEC)
    assert all(torch.equal(a, b) for a, b in zip(before, weights))  # weights restored
    m64 = TinyMLP(k, h, seed=3).double()
    target = m64(x)
    expected = []
    for s in cands.double():
        with torch.no_grad():
            for lin, w in ((m64.gate_proj, before[0]), (m64.up_proj, before[1])):
                lin.weight.copy_(_fq64(w.double() * s, SPEC) / s)
            expected.append(float((m64(x) - target).pow(2).mean()))
    expected = torch.tensor(expected, dtype=torch.float64)
    _assert_losses_close(losses, expected)
    order = torch.sort(expected).values
    assert order[1] - order[0] > 10 * LOSS_RTOL * order[0]
    assert best == int(torch.argmin(expected)) and best > 0
    # scored in bf16 (a copy of the module; the float module is untouched): losses within 2%, same choice here
    best16, losses16 = awq_scale.search_module_scale(mlp, [mlp.gate_proj, mlp.up_proj], calls, cands, SPEC,
                                                     dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(before, weights)) and mlp.gate_proj.weight.dtype == torch.float32
    torch.testing.assert_close(losses16, expected, rtol=2e-2, atol=0)
    assert best16 == best


@pytest.mark.parametrize("sym_grid,sym_clip", [(False, False), (False, True), (True, True)])
def test_clip_search_matches_a_float64_token_loop(sym_grid, sym_clip):
    spec = GridSpec(bits=3, group_size=16, sym=sym_grid)
    k, n, g = 48, 12, 16
    x = _outlier_inputs(200, k, seed=5)
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[torch.rand(n, k, generator=gen) < 0.03] *= 6  # a few large weights: clipping pays
    gram_obs = awq_observe.GramObserver(k, g)
    gram_obs.add(x[:120].float())
    gram_obs.add(x[120:].float())
    lo, hi = awq_clip.clip_search(w.float(), gram_obs.mean(), spec, sym_clip)
    # float64: per (row, group) the factor with the smallest token-space error (first on ties)
    xs = x.reshape(200, k // g, g)
    wg = w.reshape(n, k // g, g)
    best_f = torch.ones(n, k // g, dtype=torch.float64)
    best_e = torch.full((n, k // g), math.inf, dtype=torch.float64)
    base = None
    for i in range(10):
        f = 1 - i / 20
        if sym_clip:
            h = f * wg.abs().amax(2, keepdim=True)
            lo64 = -h
        else:
            lo64, h = f * wg.amin(2, keepdim=True), f * wg.amax(2, keepdim=True)
        q = _fq64(torch.maximum(torch.minimum(wg, h), lo64).reshape(n, k), spec).reshape(n, k // g, g)
        err = torch.einsum("tgj,ngj->tng", xs, q - wg).pow(2).mean(0)
        if base is None:
            base = err
        better = err < best_e * (1 - 1e-6)
        best_e = torch.where(better, err, best_e)
        best_f = torch.where(better, torch.full_like(best_f, f), best_f)
    got_f = (hi.double() / (wg.abs().amax(2) if sym_clip else wg.amax(2))).clamp(max=1)
    agree = (got_f - best_f).abs() < 1e-4
    assert agree.float().mean() > 0.97, agree.float().mean()  # near-ties may flip between fp32 and fp64
    assert (best_f < 1).any()  # clipping was chosen somewhere: the comparison can fail
    clipped = awq_clip.apply_clip(w.float(), lo, hi).double()
    q = _fq64(clipped, spec).reshape(n, k // g, g)
    err = torch.einsum("tgj,ngj->tng", xs, q - wg).pow(2).mean(0)
    assert (err <= base * (1 + 1e-5)).all()  # factor 1 is a candidate: never worse than no clip


class _Unrounded(awq.AWQ):
    """AWQ that folds its scales and returns the (folded) float weights: the FP model must not change."""

    name = "awq-unrounded-test"

    def finish(self, group, state, input_scale):
        self.folded += len(state.pairs)
        out = []
        for lin in group.linears:
            w = lin.weight.data
            out.append(LayerResult(w.clone(), torch.ones(w.shape[0], 1), torch.zeros(w.shape[0], 1),
                                   torch.zeros(w.shape[1], dtype=torch.int32)))
        return out


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folded_float64_model_equals_the_original(tmp_path, kv_heads):
    from transformers import AutoModelForCausalLM

    model = _load(make_family_model(tmp_path / "float", "llama"))
    model.config.num_key_value_heads = kv_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model.config).eval().double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    method = _Unrounded(awq.AWQOptions())
    method.folded = 0
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        quantize_blocks(model, adapter_for(model.config), method, SPEC, torch.device("cpu"), _batches(n=4),
                        progress=False)
        after = model(input_ids=ids).logits
    per_block = 4 if kv_heads == model.config.num_attention_heads else 3  # v -> o only without GQA
    assert method.folded == per_block * model.config.num_hidden_layers
    changed = {n.split(".", 3)[-1] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight"} <= changed
    assert ("self_attn.o_proj.weight" in changed) == (per_block == 4)
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)


def _quantized(src, method, options):
    model = _load(src)
    with torch.no_grad():
        quantize_blocks(model, adapter_for(model.config), registry.make_method(method, options), SPEC,
                        torch.device("cpu"), _batches(), progress=False)
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_ratio_zero_without_clip_is_rtn_and_with_gptq_is_gptq(tmp_path):
    src = make_family_model(tmp_path / "float", "llama")
    rtn = _quantized(src, "rtn", None)
    gptq = _quantized(src, "gptq", {"damp": 0.05})
    awq0 = _quantized(src, "awq", {"n_grid": 1, "no_clip": True, "awq_version": 2})
    awq_gptq0 = _quantized(src, "awq+gptq", {"n_grid": 1, "damp": 0.05, "awq_version": 2})
    clipped = _quantized(src, "awq", {"n_grid": 1, "awq_version": 2})
    for name in rtn:
        if name.endswith("lm_head"):
            continue
        assert torch.equal(awq0[name], rtn[name]), name
        torch.testing.assert_close(awq_gptq0[name], gptq[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(clipped[n], rtn[n]) for n in rtn if "v_proj" in n)  # clip acts on v
    assert all(torch.equal(clipped[n], rtn[n]) for n in rtn if "q_proj" in n or "k_proj" in n)  # q/k skipped


def test_awq_gptq_options_combine_both():
    opts = registry.make_method("awq+gptq", {"awq_version": "2", "act_order": "none", "damp": 0.2}).options
    assert opts.awq_version == 2 and opts.act_order is None and opts.damp == 0.2
    assert isinstance(opts, GPTQOptions)
    with pytest.raises(TritonqError, match="awq-version"):
        awq.AWQOptions(awq_version=3)
    with pytest.raises(TritonqError, match="max-shrink"):
        awq.AWQOptions(max_shrink=1.0)
    with pytest.raises(TritonqError, match="does not take"):
        registry.make_method("awq+gptq", {"clip_sym": True})


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors", "gptq_v2"])
def test_awq_model_packs_and_serves_through_quantlinear(tmp_path, fmt):
    from helpers import tiny_tokenizer
    from transformers import AutoModelForCausalLM
    from tritonq.engine.api import QuantizeOptions, quantize
    from tritonq.engine.data import pydoc_corpus
    from tritonq.engine.formats.registry import save_packed
    from tritonq.engine.runtime.qlinear import QuantLinear
    from tritonq.engine.runtime.serve import load_packed_model

    src = make_family_model(tmp_path / "float", "llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(pydoc_corpus()[:30000], encoding="utf-8")
    fake = tmp_path / "fake"
    quantize(QuantizeOptions(output=str(fake), model=str(src), method="awq", bits=4, group_size=32,
                             calib=str(calib), nsamples=8, seqlen=128, device="cpu", progress=False))
    packed = save_packed(fake, tmp_path / "packed", fmt)
    ours, _ = load_packed_model(packed, "cpu", "float32", cpu_int4=False)  # exact fp16 scales
    assert sum(isinstance(m, QuantLinear) for m in ours.modules()) == 14
    ids = tiny_tokenizer()("def f(x): return x", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    float_norm = AutoModelForCausalLM.from_pretrained(src).model.layers[0].input_layernorm.weight
    folded = AutoModelForCausalLM.from_pretrained(fake).model.layers[0].input_layernorm.weight
    assert not torch.equal(float_norm, folded)  # the scales live in the norms of the packed model


def test_search_sample_takes_whole_windows():
    from tritonq.engine.adapters import ScalePair

    obs = awq_observe.PairObserver(ScalePair("n", ("a.x", "a.y")), "a", sample_tokens=40)
    cos = torch.randn(1, 16, 4)
    per_window = torch.randn(8, 1, 16, 16)
    for _ in range(2):
        obs.add_call((), {"hidden_states": torch.randn(8, 16, 4), "position_embeddings": (cos, cos),
                          "attention_mask": per_window, "use_cache": False})
    assert len(obs.calls) == 1 and obs.sampled == 48  # ceil(40 / 16) = 3 windows, then the sample is full
    kwargs = obs.calls[0][1]
    assert kwargs["hidden_states"].shape[0] == 3 and kwargs["attention_mask"].shape[0] == 3
    assert kwargs["position_embeddings"][0] is cos and kwargs["use_cache"] is False


@pytest.mark.parametrize("spec", [GridSpec(bits=3, group_size=16), GridSpec(bits=4, group_size=-1, sym=True)])
def test_grouped_fake_quant_is_rtn_bit_for_bit(spec):
    from tritonq.engine.methods.rtn import round_to_nearest

    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(fake_quantize_groups(w, spec), round_to_nearest(w, spec).weight)


def test_search_losses_pick_the_first_minimum_and_refuse_all_nan():
    assert awq_scale.pick_best(torch.tensor([3.0, 1.0, 1.0, float("nan")]), "x") == 1  # strict <: first on ties
    with pytest.raises(TritonqError, match="non-finite loss"):
        awq_scale.pick_best(torch.tensor([float("nan"), float("inf")]), "block 0")


def test_auto_search_dtype_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    w32 = torch.zeros(2, 2)
    cases = [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)]
    for avx512_bf16, amx, expect in cases:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert awq_scale.search_dtype("auto", w32) is expect
    assert awq_scale.search_dtype("auto", w32.half()) is None  # a half model is scored in its own dtype
    assert awq_scale.search_dtype("float32", w32) is torch.float32


def test_observer_sums_only_the_moments_asked_for_and_names_a_missing_one():
    from tritonq.engine.adapters import ScalePair
    from tritonq.engine.methods.dh_awq import DHAWQ

    x = torch.randn(3, 7, 5, dtype=torch.float64)
    flat = x.reshape(-1, 5)
    pair = ScalePair("n", ("a.x",))
    only_abs = awq_observe.PairObserver(pair, None, 0, awq.AWQ.moments)
    every = awq_observe.PairObserver(pair, None, 0, DHAWQ.moments + ("abs",))
    for obs in (only_abs, every):
        obs.add_stat(x[:2])
        obs.add_stat(x[2:])
    for obs in (only_abs, every):
        torch.testing.assert_close(obs.mean_abs().double(), flat.abs().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(every.mean_sq().double(), flat.square().mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(every.mean().double(), flat.mean(0), rtol=1e-6, atol=1e-7)
    assert only_abs.sq_sum is None and only_abs.sum is None
    with pytest.raises(TritonqError, match="'sq' moment"):
        only_abs.mean_sq()
