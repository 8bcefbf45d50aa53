"""W8A8 export in compressed-tensors' int-quantized layout (as llm-compressor writes it), read back by the
library's own config parser and compressor, served by Int8Linear; W4A8 keeps its activation scheme."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import make_family_model, pydoc_corpus
from tritonq.engine.activations import ActQuantLinear, ActSpec, saved_act_spec
from tritonq.engine.api import QuantizeOptions, evaluate, quantize
from tritonq.engine.formats.registry import save_packed
from tritonq.engine.runtime.qlinear import Int8Linear, QuantLinear
from tritonq.engine.runtime.serve import load_packed_model

ct = pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("w8a8")
    src = make_family_model(tmp / "float", "llama")
    calib = tmp / "calib.txt"
    calib.write_text(pydoc_corpus()[:20000], encoding="utf-8")
    fake = tmp / "fake"
    quantize(QuantizeOptions(output=str(fake), model=str(src), method="smoothquant", bits=8, group_size=-1, sym=True,
                             calib=str(calib), nsamples=8, seqlen=64, device="cpu", progress=False))
    packed = save_packed(fake, tmp / "packed", "compressed-tensors")
    heldout = tmp / "heldout.txt"
    heldout.write_text(pydoc_corpus()[200000:202000], encoding="utf-8")
    return fake, packed, heldout


def test_config_parses_as_llm_compressor_w8a8(w8a8):
    from compressed_tensors.quantization import QuantizationConfig

    _, packed, _ = w8a8
    qcfg = QuantizationConfig.model_validate(json.loads((packed / "config.json").read_text())["quantization_config"])
    assert qcfg.format == "int-quantized" and qcfg.quantization_status == "compressed"
    scheme = qcfg.config_groups["group_0"]
    w, a = scheme.weights, scheme.input_activations
    assert (w.num_bits, w.type, w.symmetric, w.strategy) == (8, "int", True, "channel")
    assert (a.num_bits, a.type, a.symmetric, a.strategy, a.dynamic) == (8, "int", True, "token", True)
    assert "lm_head" in qcfg.ignore
    assert saved_act_spec(packed) == ActSpec(8, "per-token", True)


def test_int8_weights_round_trip_exactly(w8a8):
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    fake, packed, _ = w8a8
    tensors = load_file(str(packed / "model.safetensors"))
    floats = load_file(str(fake / "model.safetensors"))
    params = load_file(str(fake / "quant_params.safetensors"))
    scheme = QuantizationConfig.model_validate(
        json.loads((packed / "config.json").read_text())["quantization_config"]).config_groups["group_0"]
    layers = json.loads((fake / "quantization.json").read_text())["layers"]
    for name in layers:
        q = tensors[f"{name}.weight"]
        assert q.dtype == torch.int8 and tensors[f"{name}.weight_scale"].shape == (q.shape[0], 1)
        codes = torch.round(floats[f"{name}.weight"] / params[f"{name}.scale"]) + params[f"{name}.zero"]
        assert torch.equal(q.to(torch.int16), (codes - 128).to(torch.int16))
        back = IntQuantizationCompressor.decompress(
            {"weight": q, "weight_scale": tensors[f"{name}.weight_scale"]}, scheme)["weight"]
        assert torch.equal(back.float(), floats[f"{name}.weight"])


def test_export_serves_w8a8_at_the_fake_quantized_perplexity(w8a8):
    fake, packed, heldout = w8a8
    model, _ = load_packed_model(packed, device="cpu", dtype="float32")
    wrapped = [m for m in model.modules() if isinstance(m, ActQuantLinear)]
    assert wrapped and all(isinstance(m.linear, Int8Linear) for m in wrapped)
    p_fake = evaluate(str(fake), str(heldout), seqlen=64, device="cpu", progress=False).perplexity
    p_packed = evaluate(str(packed), str(heldout), seqlen=64, device="cpu", progress=False).perplexity
    assert abs(p_packed / p_fake - 1) < 0.005, (p_fake, p_packed)


def test_w4a8_records_its_activation_scheme(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    src = make_family_model(tmp_path / "float", "llama")
    fake = tmp_path / "fake"
    quantize(QuantizeOptions(output=str(fake), model=str(src), method="rtn", bits=4, group_size=32, act_bits=8,
                             act_scheme="per-tensor", act_sym=False, device="cpu", progress=False))
    packed = save_packed(fake, tmp_path / "packed", "compressed-tensors")
    qcfg = QuantizationConfig.model_validate(json.loads((packed / "config.json").read_text())["quantization_config"])
    assert qcfg.format == "pack-quantized"
    a = qcfg.config_groups["group_0"].input_activations
    assert (a.num_bits, a.symmetric, a.strategy, a.dynamic) == (8, False, "tensor", True)
    model, _ = load_packed_model(packed, device="cpu", dtype="float32")
    wrapped = [m for m in model.modules() if isinstance(m, ActQuantLinear)]
    assert wrapped and all(isinstance(m.linear, QuantLinear) for m in wrapped)
    assert wrapped[0].spec == ActSpec(8, "per-tensor", False)
