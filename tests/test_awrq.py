"""AWRQ (engine/awrq.py): the least-squares reformulation against a float64 oracle, the hard property
|WX - W'X_q| <= |WX - W X_q|, GPTQ exactly under an identity activation quantizer, and a run with smoothing."""

import pytest
import torch
from test_pipeline import make_family_model
from tritonq.engine.activations import ActSpec, fake_quantize_activation
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec
from tritonq.engine.hessian import HessianAccumulator
from tritonq.engine.methods.act_quant import WithActivationQuant
from tritonq.engine.methods.awrq import AWRQ, QuantizedInputStats, reformulate
from tritonq.engine.methods.gptq import GPTQ, GPTQOptions, solve
from tritonq.engine.methods.registry import make_method
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError

ACT = ActSpec(8, "per-tensor", False)


def _inputs(tokens=3000, k=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(k, generator=gen))  # channel-varying ranges, as LLM activations
    return torch.randn(6, tokens // 6, k, generator=gen) * scales + 0.2, gen


def test_stats_and_reformulation_match_float64_least_squares():
    x, gen = _inputs()
    w = torch.randn(16, 24, generator=gen)
    stats = QuantizedInputStats(24, torch.device("cpu"), ACT)
    for chunk in torch.split(x, 2):
        stats.add(chunk)
    x64 = x.reshape(-1, 24).double()
    xq64 = fake_quantize_activation(x, ACT).reshape(-1, 24).double()
    n = x64.shape[0]
    h64 = 2 * xq64.T @ xq64 / n
    torch.testing.assert_close(stats.hessian.hessian.double(), h64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.cross.double(), 2 * (x64 - xq64).T @ xq64 / n, rtol=1e-4, atol=1e-6)
    damp = 0.01
    got = reformulate(w, stats.hessian.hessian, stats.cross, damp, "layer")
    # oracle: argmin |W X - W' X_q|^2 + lambda |W' - W|^2 = (W X X_q^T + lambda W)(X_q X_q^T + lambda I)^-1
    lam = damp * torch.diag(h64).mean() * n / 2
    lhs = w.double() @ x64.T @ xq64 + lam * w.double()
    oracle = torch.linalg.solve(xq64.T @ xq64 + lam * torch.eye(24, dtype=torch.float64), lhs.T).T
    torch.testing.assert_close(got.double(), oracle, rtol=1e-4, atol=1e-4)
    # the hard property: E = 0 is feasible, so the fit is never worse than keeping W on the quantized inputs
    err_new = (x64 @ w.double().T - xq64 @ got.double().T).norm()
    err_old = (x64 @ w.double().T - xq64 @ w.double().T).norm()
    assert err_new < err_old


def test_quantized_output_error_beats_gptq_on_the_quantized_hessian():
    x, gen = _inputs(tokens=4000, k=32, seed=1)
    w = torch.randn(24, 32, generator=gen)
    stats = QuantizedInputStats(32, torch.device("cpu"), ACT)
    stats.add(x)
    spec = GridSpec(bits=4, group_size=-1)
    opts = GPTQOptions(act_order="none", damp=0.01)
    h = stats.hessian.hessian
    awrq = solve([reformulate(w, h, stats.cross, opts.damp, "l")], h, spec, ["l"], opts)[0].weight
    gptq = solve([w], h, spec, ["l"], opts)[0].weight
    x2, xq = x.reshape(-1, 32), fake_quantize_activation(x, ACT).reshape(-1, 32)
    target = x2 @ w.T

    def err(q):
        return float((target - xq @ q.T).square().mean())
    assert err(awrq) < err(gptq)


def test_identity_activation_quantizer_is_gptq_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", "llama")
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.split(torch.randint(0, 256, (4, 32), generator=gen), 2))
    spec = GridSpec(bits=4, group_size=32)
    results = []
    for method in (GPTQ(GPTQOptions()), AWRQ()):
        if isinstance(method, AWRQ):
            method.act = None  # identity: X_q = X, so M = 0 and W' = W
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        quantize_blocks(model, adapter_for(model.config), method, spec, torch.device("cpu"), batches, progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize("smooth", [False, True])
def test_awrq_w4a8_runs_and_differs_from_gptq(tmp_path, smooth):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", "llama")
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.split(torch.randint(0, 256, (4, 32), generator=gen), 2))
    spec = GridSpec(bits=4, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 256, (1, 40), generator=gen)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        method = make_method("awrq", {"smooth": smooth})
        quantize_blocks(model, adapter_for(model.config), WithActivationQuant(method, method.default_act), spec,
                        torch.device("cpu"), batches, progress=False)
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all() and (after - reference).norm() / reference.norm() < 0.5
    assert method.describe()["smooth"] is smooth
    with pytest.raises(TritonqError, match="--min"):
        make_method("awrq", {"min": 0.0})


def test_hessian_of_quantized_inputs_uses_the_shared_accumulator():
    x, _ = _inputs(tokens=600, k=8, seed=2)
    stats = QuantizedInputStats(8, torch.device("cpu"), None)
    plain = HessianAccumulator(8, torch.device("cpu"))
    for chunk in torch.split(x, 3):
        stats.add(chunk)
        plain.add(chunk)
    assert torch.equal(stats.hessian.hessian, plain.hessian) and torch.count_nonzero(stats.cross) == 0
