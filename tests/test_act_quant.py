"""Dynamic activation quantization (engine/act_quant.py): the grids against float64 transcriptions, the
wrapper, propagation through any method, and the record that eval reads back."""

import json

import pytest
import torch
from test_pipeline import make_family_model, pydoc_corpus
from tritonq.engine.activations import (
    ActQuantLinear,
    ActSpec,
    fake_quantize_activation,
    quantize_activation,
    resolve_act_spec,
)
from tritonq.engine.adapters import adapter_for
from tritonq.engine.api import QuantizeOptions, evaluate, quantize
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.act_quant import WithActivationQuant
from tritonq.engine.methods.registry import make_method
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError


def _fq64(x, bits, scheme, sym):
    """Float64 transcription of the grids of awq_family.md §0.1 (per sequence for per-tensor)."""
    x = x.double()
    dims = (-1,) if scheme == "per-token" else tuple(range(1, x.dim()))
    if sym:
        s = (x.abs().amax(dim=dims, keepdim=True) / (2 ** (bits - 1) - 1)).clamp(min=1e-5)
        return torch.clamp(torch.round(x / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
    lo = x.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = x.amax(dim=dims, keepdim=True).clamp(min=0)
    s = ((hi - lo) / (2**bits - 1)).clamp(min=1e-5)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("scheme", ["per-token", "per-tensor"])
@pytest.mark.parametrize("sym", [True, False])
def test_grid_matches_float64_transcription(bits, scheme, sym):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 17, 40, generator=gen) * torch.rand(40, generator=gen) * 4 + 0.3
    spec = ActSpec(bits, scheme, sym)
    got = fake_quantize_activation(x, spec)
    ref = _fq64(x, bits, scheme, sym)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5 * float(x.abs().max()))
    codes, _, _ = quantize_activation(x, spec)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert codes.min() >= lo and codes.max() <= hi and torch.equal(codes, codes.round())
    err = (got - x).abs()
    assert 0 < err.max() <= (x.abs().max() / (2 ** (bits - 1) - 1)) * (1.01 if sym else 1.0)


def test_zero_is_exact_and_per_tensor_is_per_sequence():
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0.0
    for spec in (ActSpec(8, "per-tensor", False), ActSpec(8, "per-token", True), ActSpec(4, "per-token", False)):
        q = fake_quantize_activation(x, spec)
        assert torch.all(q[:, 3] == 0)
        # a sequence's grid does not depend on the other sequences of the call
        torch.testing.assert_close(fake_quantize_activation(x[1:2], spec), q[1:2], rtol=0, atol=0)


def test_bad_settings_are_refused():
    with pytest.raises(TritonqError, match="act-bits"):
        ActSpec(bits=5)
    with pytest.raises(TritonqError, match="act-scheme"):
        ActSpec(scheme="per-channel")
    with pytest.raises(TritonqError, match="need --act-bits"):
        resolve_act_spec(None, None, "per-tensor", None)
    assert resolve_act_spec(None, None, None, None) is None
    assert resolve_act_spec(ActSpec(8, "per-tensor", False), 6, None, None) == ActSpec(6, "per-tensor", False)


def test_wrapper_quantizes_the_input():
    lin = torch.nn.Linear(16, 8)
    spec = ActSpec(4, "per-token", True)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(ActQuantLinear(lin, spec)(x), lin(fake_quantize_activation(x, spec)))
    assert not torch.allclose(ActQuantLinear(lin, spec)(x), lin(x))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_any_method_propagates_on_quantized_inputs(tmp_path, method):
    """Block 0's first group sees the same inputs either way; later groups see act-quantized predecessors."""
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", "llama")
    spec = GridSpec(bits=4, group_size=32)
    gen = torch.Generator().manual_seed(0)
    batches = list(torch.split(torch.randint(0, 256, (4, 32), generator=gen), 2))
    weights = {}
    for act in (None, ActSpec(4, "per-token", True)):
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        m = make_method(method)
        if act is not None:
            m = WithActivationQuant(m, act)
        quantize_blocks(model, adapter_for(model.config), m, spec, torch.device("cpu"),
                        batches if m.calibrated else None, progress=False)
        weights[act] = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert not any(isinstance(mod, ActQuantLinear) for mod in model.modules())  # propagation only
    plain, quant = weights[None], weights[ActSpec(4, "per-token", True)]
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(plain[first], quant[first])
    later = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(plain[later], quant[later]) == (method == "rtn")


def test_setting_is_recorded_and_applied_in_eval(tmp_path):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(pydoc_corpus()[200000:201000], encoding="utf-8")
    src = make_family_model(tmp_path / "float", "llama")
    out = tmp_path / "w4a8"
    quantize(QuantizeOptions(output=str(out), model=str(src), method="rtn", bits=4, group_size=32, act_bits=8,
                             act_scheme="per-tensor", act_sym=False, device="cpu", progress=False))
    meta = json.loads((out / "quantization.json").read_text())
    record = {"bits": 8, "scheme": "per-tensor", "sym": False, "dynamic": True}
    assert meta["activations"] == record
    assert json.loads((out / "config.json").read_text())["tritonq_activations"] == record
    saved = evaluate(str(out), str(heldout), seqlen=64, device="cpu", progress=False)
    weights_only = evaluate(str(out), str(heldout), seqlen=64, device="cpu", progress=False, act_bits=8,
                            act_scheme="per-token", act_sym=True)
    assert saved.perplexity != weights_only.perplexity
    float_a4 = evaluate(str(src), str(heldout), seqlen=64, device="cpu", progress=False, act_bits=4)
    float_ppl = evaluate(str(src), str(heldout), seqlen=64, device="cpu", progress=False)
    assert float_a4.perplexity != float_ppl.perplexity
