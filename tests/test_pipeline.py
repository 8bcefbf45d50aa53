"""End to end on tiny random models of every supported family: quantize through the API, check the
output directory, that weights lie on the grid, and that GPTQ beats RTN on held-out text."""

import hashlib
import json

import pytest
import torch
from helpers import tiny_tokenizer
from safetensors.torch import load_file
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.data import pydoc_corpus
from tritonq.engine.grid import codes_of, dequantize

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
}


def make_family_model(path, family, seed=0):
    import transformers

    cls_name, extra = FAMILIES[family]
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=259,
                  max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family != "opt":
        common.update(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
    config = getattr(transformers, cls_name)(**common, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(pydoc_corpus()[:60000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    text = pydoc_corpus()[200000:204096]
    return tiny_tokenizer()(text, return_tensors="pt").input_ids[:, :4096].reshape(16, 256)


def _logit_error(model_dir, reference, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return float(((model(input_ids=ids).logits - reference) ** 2).mean())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(tmp_path, family, calib_file, heldout):
    from transformers import AutoModelForCausalLM

    src = make_family_model(tmp_path / "float", family)
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(input_ids=heldout).logits
    errors = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        opts = QuantizeOptions(output=str(out), model=str(src), method=method, bits=3, group_size=32,
                               calib=str(calib_file), nsamples=16, seqlen=256, seed=0, device="cpu",
                               progress=False)
        summary = quantize(opts)
        assert summary.layers == 2 * 7 - (2 if family == "opt" else 0)
        meta = json.loads((out / "quantization.json").read_text())
        assert meta["method"] == method and meta["bits"] == 3 and meta["group_size"] == 32
        assert meta["architecture"] == family
        if method == "gptq":
            assert meta["calibration"]["sha256"] == hashlib.sha256(calib_file.read_bytes()).hexdigest()
            assert meta["calibration"]["nsamples"] == 16 and meta["calibration"]["seed"] == 0
        # every quantized weight is exactly scale * (code - zero) of its recorded grid
        params = load_file(str(out / "quant_params.safetensors"))
        weights = load_file(str(out / "model.safetensors"))
        assert sorted(meta["layers"]) == sorted({k.rsplit(".", 1)[0] for k in params})
        for name in meta["layers"]:
            w = weights[f"{name}.weight"].float()
            scale, zero, g_idx = params[f"{name}.scale"], params[f"{name}.zero"], params[f"{name}.g_idx"]
            assert torch.equal(dequantize(codes_of(w, scale, zero, g_idx, 7), scale, zero, g_idx), w), name
        assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"
        errors[method] = _logit_error(out, reference, heldout)
    assert errors["gptq"] < errors["rtn"], errors


def test_act_order_and_per_channel_run(tmp_path, calib_file):
    src = make_family_model(tmp_path / "float", "llama", seed=1)
    cases = (({"act_order": "static"}, {"group_size": 32}), ({"act_order": "dynamic"}, {"group_size": 32}),
             ({"act_order": None}, {"group_size": -1, "sym": True}))
    for i, (method_options, extra) in enumerate(cases):
        out = tmp_path / f"out{i}"
        quantize(QuantizeOptions(output=str(out), model=str(src), method="gptq", bits=4, calib=str(calib_file),
                                 nsamples=8, seqlen=128, device="cpu", progress=False,
                                 method_options=method_options, **extra))
        meta = json.loads((out / "quantization.json").read_text())
        assert meta["act_order"] == bool(method_options["act_order"])
        assert meta["group_size"] == extra["group_size"]
