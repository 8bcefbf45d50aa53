"""The online Hadamard on the ``down_proj`` input (``engine/online_hadamard.py``, issue 24 item 2).

* the transform equals a float64 dense ``x @ T^T`` with ``T = (B (x) S_p) diag(s) / sqrt(n)`` built independently
  here (1536 = Paley I(11) 12 x 128, 576, a power of two, a width with no Hadamard built here), and ``T`` is
  orthogonal; the negative control: the same matrix without the signs does not match;
* the float rotated model with the online part folded and attached keeps its float64 logits to 1e-5, every
  Llama-like family; folded but not attached, it does not (the check can fail);
* ``ActQuantLinear`` rotates before it quantizes, over ``nn.Linear``, ``QuantLinear`` and ``Int8Linear``, each equal
  to its fake-quantized float reference; quantizing first then rotating differs;
* a quantize run with ``--act-bits`` records the transform, drops the up -> down scale pair for the methods, and
  its fake and compressed-tensors outputs give the same logits after loading (the compressed-tensors output's
  ``transform_config`` as other loaders read it: ``tests/test_ct_transform.py``); weight-only rotated runs stay
  offline-only; GPTQ, AWQ and GGUF formats refuse the online transform before any work.
"""

import json
import math

import pytest
import torch
import torch.nn as nn
from test_pipeline import FAMILIES, make_family_model
from test_rotation import LLAMA_LIKE, _ids, _logits, _model, _randomize
from tritonq.engine.activations import ActQuantLinear, ActSpec, fake_quantize_activation
from tritonq.engine.adapters import adapter_for
from tritonq.engine.online_hadamard import (
    OnlineHadamard,
    apply_online,
    attach,
    fold_online,
    online_targets,
    without_online_pairs,
)
from tritonq.engine.orthogonal import paley_1, paley_2, sylvester
from tritonq.engine.rotation import RotationSpec, rotate_model
from tritonq.errors import TritonqError


def _dense(n, base, signs):
    """``T`` from its definition, in float64, without the butterflies."""
    h = sylvester(n) if base is None else torch.kron(base, sylvester(n // base.shape[0]))
    return h * signs[None, :] / math.sqrt(n)


@pytest.mark.parametrize("n, base, how", [(1536, paley_1(11), "Paley I (GF(11)) 12 x Sylvester 128"),
                                          (576, paley_2(17), "Paley II (GF(17)) 36 x Sylvester 16"),
                                          (256, None, "Sylvester 256")])
def test_transform_equals_dense_reference(n, base, how):
    t = OnlineHadamard.build(n, seed=7)
    assert t.construction == f"{how}, random signs"
    x = torch.randn(3, 5, n, dtype=torch.float64) * 3
    ref = _dense(n, base, t.signs)
    torch.testing.assert_close(t(x), x @ ref.T, rtol=0, atol=1e-12)  # float64 in, float64 butterflies
    # fp32 (what runs): the error of n-term fp32 sums, ~ sqrt(log n) ulps of |x|
    torch.testing.assert_close(t(x.float()).double(), x @ ref.T, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert (ref @ ref.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    unsigned = _dense(n, base, torch.ones(n, dtype=torch.float64))
    assert (t(x) - x @ unsigned.T).abs().max() > 0.5  # the negative control: the signs matter
    assert not torch.equal(OnlineHadamard.build(n, seed=8).signs, t.signs)  # and follow the seed


def test_width_without_a_hadamard_is_orthogonal():
    t = OnlineHadamard.build(23 * 8, seed=1)  # no Hadamard of order 184 built here: a Haar base 23 x Sylvester 8
    assert "Haar random 23 x Sylvester 8" in t.construction
    m = t.matrix()
    assert (m @ m.T - torch.eye(184, dtype=torch.float64)).abs().max() < 1e-12


def _family_model(family, **overrides):
    """make_family_model's configuration (tests/test_pipeline.py) with ``overrides``, float64, in memory."""
    import transformers

    cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cls_name)(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=259, max_position_embeddings=512,
        num_key_value_heads=2, tie_word_embeddings=False, **{"intermediate_size": 128, **overrides}, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).double().eval()


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_rotated_model_with_online_part_keeps_float64_logits(tmp_path, family):
    model = _family_model(family, intermediate_size=96)  # 96 = Paley I(11) 12 x 8
    _randomize(model)
    adapter = adapter_for(model.config)
    before = _logits(model)
    rotate_model(model, adapter, RotationSpec("hadamard", seed=5))
    down = adapter.block_list(model)[0].get_submodule(online_targets(adapter)[0])
    folded_before = down.weight.detach().clone()
    transform = apply_online(model, adapter, seed=5, fold=True)
    assert transform.construction == "Paley I (GF(11)) 12 x Sylvester 8, random signs"
    assert (down.weight - folded_before).abs().max() > 1e-2  # the weights really absorbed T^T
    assert before.abs().max() > 0.1
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    for block in adapter.block_list(model):  # folded but not run online: not the same model
        block.get_submodule(online_targets(adapter)[0])._forward_pre_hooks.clear()
    assert (_logits(model) - before).abs().max() > 1e-3


def test_scale_pair_across_the_transform_is_dropped(tmp_path):
    adapter = adapter_for(_model(tmp_path / "m", "llama").config)
    assert online_targets(adapter) == ("mlp.down_proj",)
    kept = [p.smooth for p in without_online_pairs(adapter).input_pairs]
    assert kept == ["input_layernorm", "post_attention_layernorm"]
    assert "mlp.up_proj" in [p.smooth for p in adapter.input_pairs]


def test_propagation_runs_the_transform_once(tmp_path):
    """The pipeline's next-block inputs equal the quantized block run as eval runs it: the down_proj tail is replayed
    from its own (unrotated) input, so the wrapper rotates it once (a replay of the rotated input would rotate it
    twice)."""
    from collections import defaultdict

    from tritonq.engine.activations import apply_activation_quant
    from tritonq.engine.cache import ActivationCache
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.methods.act_quant import WithActivationQuant
    from tritonq.engine.methods.registry import make_method
    from tritonq.engine.pipeline import QuantizeReport, quantize_block
    from tritonq.engine.stages import capture_block_inputs, run_block

    model = _family_model("llama").float()
    _randomize(model)
    adapter = adapter_for(model.config)
    rotate_model(model, adapter, RotationSpec("hadamard", seed=1))
    apply_online(model, adapter, seed=1, fold=True)
    adapter = without_online_pairs(adapter)
    act = ActSpec(8, "per-token", True)
    method = WithActivationQuant(make_method("rtn", None), act)
    device = torch.device("cpu")
    chunks = capture_block_inputs(model, adapter, [_ids(vocab=256, n=1, seed=s) for s in (1, 2)], device)
    block = adapter.block_list(model)[0]
    report = QuantizeReport(seconds=defaultdict(float))
    out, _ = quantize_block(block, 0, chunks, adapter, model.config, method, GridSpec(bits=8, group_size=32), device,
                            ActivationCache("device", device), report)
    apply_activation_quant(block, act, adapter.linear_names())
    with torch.no_grad():
        for c, o in zip(chunks, out):
            want = run_block(block, c.hidden, c.kwargs)
            assert (want - c.hidden).abs().max() > 0.01  # the block does something
            torch.testing.assert_close(o.hidden, want, rtol=1e-5, atol=1e-6)


def _transform_first_reference(linear_weight, bias, t, x, spec):
    return fake_quantize_activation(t(x), spec) @ linear_weight.T + bias


@pytest.mark.parametrize("bits", [8, 4])
def test_act_quant_rotates_before_it_quantizes(bits):
    gen = torch.Generator().manual_seed(bits)
    n, k = 24, 96
    lin = nn.Linear(k, n)
    x = torch.randn(2, 7, k, generator=gen)
    x[..., 5] *= 30  # an outlier channel: the rotation spreads it
    t = OnlineHadamard.build(k, seed=2)
    fold_online(lin, t)
    attach(lin, t)
    spec = ActSpec(bits, "per-token", True)
    wrapped = ActQuantLinear(lin, spec)
    want = _transform_first_reference(lin.weight.detach(), lin.bias.detach(), t, x, spec)
    torch.testing.assert_close(wrapped(x), want, rtol=1e-5, atol=1e-5)
    wrong = t(fake_quantize_activation(x, spec)) @ lin.weight.detach().T + lin.bias.detach()
    assert (wrapped(x) - wrong).abs().max() > 1e-3  # the order matters
    with pytest.raises(TritonqError, match="already has an online transform"):
        attach(lin, t)


def _packed_int4(n, k, seed):
    from tritonq.engine.formats.records import PackedLinear
    from tritonq.kernels.pack import pack_int4

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // 32, n, generator=gen) * 0.05 + 0.002).half().float()
    zeros = torch.randint(0, 16, (k // 32, n), generator=gen).float()
    return PackedLinear(pack_int4(codes), scales, zeros, None, 32, k, n, torch.randn(n, generator=gen))


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_packed_linears_run_the_transform(kind):
    """QuantLinear / Int8Linear with the hook equal their dequantized weight on the rotated, quantized input."""
    from tritonq.engine.formats.records import PackedInt8Linear
    from tritonq.engine.runtime.qlinear import Int8Linear, QuantLinear

    n, k = 64, 96
    gen = torch.Generator().manual_seed(11)
    if kind == "int4":
        layer = QuantLinear(_packed_int4(n, k, 3), torch.float32)
        spec = ActSpec(8, "per-token", True)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        layer = Int8Linear(PackedInt8Linear(codes, torch.rand(n, generator=gen) * 0.01 + 1e-3, k, n), torch.float32)
        spec = ActSpec(8, "per-token", True)  # the int8 x int8 path of forward_act
    w = layer.dequantized_weight().float()
    bias = layer.bias if layer.bias is not None else torch.zeros(n)
    t = OnlineHadamard.build(k, seed=4)
    attach(layer, t)
    x = torch.randn(3, k, generator=gen) * 2
    plain = layer(x)  # weight-only: the hook rotates
    torch.testing.assert_close(plain, t(x) @ w.T + bias, rtol=1e-4, atol=1e-4)
    got = ActQuantLinear(layer, spec)(x)
    want = fake_quantize_activation(t(x), spec) @ w.T + bias
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * scale)
    assert (got - (fake_quantize_activation(x, spec) @ w.T + bias)).abs().max() > 0.05 * scale  # not unrotated


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory, calib_file):
    """W4A8 GPTQ with --rotate hadamard on a tiny Llama: the fake output and its compressed-tensors twin."""
    from tritonq.engine.api import QuantizeOptions, quantize

    root = tmp_path_factory.mktemp("w4a8")
    src = make_family_model(root / "src", "llama")
    common = dict(model=str(src), method="gptq", bits=4, group_size=32, act_bits=8, rotate="hadamard", rotate_seed=3,
                  calib=str(calib_file), nsamples=8, seqlen=64, device="cpu", dtype="float32", progress=False)
    quantize(QuantizeOptions(output=str(root / "fake"), **common))
    quantize(QuantizeOptions(output=str(root / "ct"), out_format="compressed-tensors", **common))
    return root


def test_quantize_records_and_round_trips(w4a8):
    """The record, the fake output's logits rebuilt by eval, and the compressed-tensors output's packed logits equal
    the fake ones; without the online part the saved weights are another model."""
    from tritonq.engine.api import load_evaluation_model

    meta = json.loads((w4a8 / "fake" / "quantization.json").read_text())
    assert meta["online_hadamard"] == {"size": 128, "base_order": 1, "power_of_two": 128,
                                       "construction": "Sylvester 128, random signs", "seed": 3,
                                       "at": "down_proj input"}
    for out in ("fake", "ct"):
        assert json.loads((w4a8 / out / "quantization.json").read_text())["online_hadamard"] == meta["online_hadamard"]
        config = json.loads((w4a8 / out / "config.json").read_text())
        assert config["tritonq_online_hadamard"] == meta["online_hadamard"]
    groups = json.loads((w4a8 / "ct" / "config.json").read_text())["quantization_config"]["transform_config"]
    assert list(groups["config_groups"]) == ["R4"]  # what other loaders read: tests/test_ct_transform.py
    fake = load_evaluation_model(str(w4a8 / "fake"), torch.device("cpu"), torch.float32)
    packed = load_evaluation_model(str(w4a8 / "ct"), torch.device("cpu"), torch.float32)
    down = fake.model.layers[0].mlp.down_proj
    assert isinstance(down, ActQuantLinear) and isinstance(down.linear.input_transform, OnlineHadamard)
    assert isinstance(packed.model.layers[0].mlp.down_proj.linear.input_transform, OnlineHadamard)
    ids = _ids()
    with torch.no_grad():
        a, b = fake(input_ids=ids).logits, packed(input_ids=ids).logits
    assert a.abs().max() > 0.1
    assert float((a - b).pow(2).mean() / a.pow(2).mean()) < 1e-4
    for block in fake.model.layers:  # without the online part the saved weights are another model
        block.mlp.down_proj.linear._forward_pre_hooks.clear()
        block.mlp.down_proj.linear.input_transform = None
    with torch.no_grad():
        c = fake(input_ids=ids).logits
    assert float((a - c).pow(2).mean() / a.pow(2).mean()) > 1e-3


def test_eval_and_generate_rebuild_it(w4a8, tmp_path):
    """``tritonq eval`` (``evaluate``) scores fake and packed alike; ``generate``'s loader and a packed copy
    without its quantization.json (config.json's record) run the transform too."""
    import shutil

    from tritonq.engine.api import evaluate
    from tritonq.engine.data import pydoc_corpus
    from tritonq.engine.runtime.serve import load_generation_model

    data = tmp_path / "heldout.txt"
    data.write_text(pydoc_corpus()[200000:206000], encoding="utf-8")
    fake = evaluate(str(w4a8 / "fake"), str(data), seqlen=128, device="cpu", progress=False).perplexity
    packed = evaluate(str(w4a8 / "ct"), str(data), seqlen=128, device="cpu", progress=False).perplexity
    assert abs(packed / fake - 1) < 0.005
    model, _ = load_generation_model(str(w4a8 / "fake"), "cpu", "float32")
    assert isinstance(model.model.layers[1].mlp.down_proj.input_transform, OnlineHadamard)
    copy = tmp_path / "ct-copy"
    shutil.copytree(w4a8 / "ct", copy)
    (copy / "quantization.json").unlink()
    again = evaluate(str(copy), str(data), seqlen=128, device="cpu", progress=False).perplexity
    assert again == pytest.approx(packed, rel=1e-6)


@pytest.mark.parametrize("fmt", ["gptq_v2", "awq"])
def test_pack_refuses_formats_without_it(w4a8, tmp_path, fmt):
    from tritonq.engine.formats.registry import save_packed

    with pytest.raises(TritonqError, match=f"which {fmt} cannot hold; pack it as compressed-tensors"):
        save_packed(w4a8 / "fake", tmp_path / "out", fmt)
    assert not (tmp_path / "out").exists()


def test_weight_only_rotation_stays_offline(tmp_path):
    from tritonq.engine.api import QuantizeOptions, quantize

    src = make_family_model(tmp_path / "src", "llama")
    quantize(QuantizeOptions(output=str(tmp_path / "out"), model=str(src), method="rtn", bits=4, group_size=32,
                             rotate="hadamard", device="cpu", progress=False))
    assert "online_hadamard" not in json.loads((tmp_path / "out" / "quantization.json").read_text())


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq", "gguf"])
def test_formats_without_online_transforms_refuse(tmp_path, fmt):
    from tritonq.engine.api import QuantizeOptions, quantize

    src = make_family_model(tmp_path / "src", "llama")
    with pytest.raises(TritonqError, match=f"--format {fmt} cannot hold the online Hadamard"):
        quantize(QuantizeOptions(output=str(tmp_path / "out"), model=str(src), method="rtn", bits=4, group_size=32,
                                 act_bits=8, rotate="hadamard", out_format=fmt, device="cpu", progress=False))
    assert not (tmp_path / "out").exists()
