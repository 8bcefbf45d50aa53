"""SmoothQuant (engine/smoothquant.py): folding leaves the float64 block unchanged (GQA v -> o included), the
alpha = 0.5 balance property, and W8A8 staying close to float on a tiny model."""

import pytest
import torch
from test_pipeline import make_family_model
from tritonq.engine.activations import ActSpec
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.act_quant import WithActivationQuant
from tritonq.engine.methods.base import LayerResult
from tritonq.engine.methods.smoothquant import SmoothQuant, smoothing_scale
from tritonq.engine.pipeline import quantize_blocks
from tritonq.errors import TritonqError


class FoldOnly(SmoothQuant):
    """SmoothQuant's observation and folding, weights left in float: the model's function must not change."""

    name = "smoothquant-fold-only"

    def quantize(self, group, state):
        from tritonq.engine.methods.smoothquant import MIN_WEIGHT_MAX, fold_smoothing

        self.scales.update(fold_smoothing(group, state, self.options.alpha, MIN_WEIGHT_MAX))
        return [LayerResult(lin.weight.data.clone(), torch.ones(lin.out_features, 1),
                            torch.zeros(lin.out_features, 1), torch.zeros(lin.in_features, dtype=torch.int32))
                for lin in group.linears]


def _model(tmp_path, family, kv_heads=None):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", family)
    model = AutoModelForCausalLM.from_pretrained(src).eval().double()
    if kv_heads is not None:
        model.config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).eval().double()
    with torch.no_grad():  # outlier channels, as SmoothQuant targets, so the scales are far from 1
        for layer in model.model.layers if family != "opt" else model.model.decoder.layers:
            norm = layer.input_layernorm if family != "opt" else layer.self_attn_layer_norm
            norm.weight[:3] *= 20.0
    return model


def _batches():
    gen = torch.Generator().manual_seed(0)
    return list(torch.split(torch.randint(0, 256, (4, 40), generator=gen), 2))


@pytest.mark.parametrize("family,kv_heads", [("llama", None), ("llama", 4), ("opt", None)])
def test_folded_float64_block_is_unchanged(tmp_path, family, kv_heads):
    model = _model(tmp_path, family, kv_heads)
    method = FoldOnly(SmoothQuant.Options(alpha=0.6))
    method.scales = {}
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        quantize_blocks(model, adapter_for(model.config), method, GridSpec(bits=8, group_size=-1, sym=True),
                        torch.device("cpu"), _batches(), progress=False)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)
    # every producer was rescaled, v_proj included under grouped-query attention (kv 2 of 4 heads)
    smooths = {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"}
    if family == "opt":
        smooths = {"self_attn_layer_norm", "final_layer_norm", "self_attn.v_proj"}
    assert set(method.scales) == smooths
    prefix = "model.layers.0." if family != "opt" else "model.decoder.layers.0."
    for s in smooths:
        assert not torch.equal(before[prefix + s + ".weight"], dict(model.named_parameters())[prefix + s + ".weight"])
        assert (method.scales[s] - 1).abs().max() > 0.1


def test_alpha_half_balances_activation_and_weight_maxima():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(24, generator=gen) * 10 + 0.1
    weights = [torch.randn(8, 24, generator=gen), torch.randn(5, 24, generator=gen) * 3]
    s = smoothing_scale(a, weights, alpha=0.5, min_scale=1e-5)
    w_max = torch.cat(weights).abs().amax(dim=0)
    torch.testing.assert_close(a / s, (a * w_max).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.cat(weights).abs().amax(dim=0) * s, (a * w_max).sqrt(), rtol=1e-5, atol=0)
    s_min = smoothing_scale(a * 0, weights, alpha=0.5, min_scale=0.3)
    assert torch.all(s_min == 0.3)


def test_w8a8_stays_close_to_float(tmp_path):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", "llama")
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        method = WithActivationQuant(SmoothQuant(), SmoothQuant.default_act)
        quantize_blocks(model, adapter_for(model.config), method, GridSpec(bits=8, group_size=-1, sym=True),
                        torch.device("cpu"), _batches(), progress=False)
        after = model(input_ids=ids).logits
    rel = (after - reference).norm() / reference.norm()
    assert 0 < rel < 0.02, rel
    assert SmoothQuant.default_act == ActSpec(8, "per-token", True)
    with pytest.raises(TritonqError, match="alpha"):
        SmoothQuant.Options(alpha=1.5)
