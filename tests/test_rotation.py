"""``--rotate {none,hadamard,random}``: the matrices (``engine/orthogonal.py``) and the model transform
(``engine/rotation.py``), then a quantize run that rotates before calibration.

* every Hadamard construction gives +-1 entries with ``H H^T = n I``, and the rotations are orthogonal in float64
  (576 = Paley II(17) 36 x Sylvester 16, 64, 2048, 36, and 92, where none is built and a random one is used);
* the rotated float model's logits equal the original's to 1e-5 in float64 for every Llama-like family, with
  random norms and biases, GQA, tied embeddings and a width that is not a power of two;
* the check can fail: the value heads rotated without their ``o_proj`` columns change the logits;
* OPT's LayerNorm is refused before anything loads, with one line;
* ``quantize --rotate hadamard`` records the rotation, saves the rotated model quantized (RTN of the rotated
  weights, not model-free), its packed output loads, and ``report`` shows the column.
"""

import json

import pytest
import torch
import torch.nn as nn
from helpers import tiny_tokenizer
from test_pipeline import FAMILIES, make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.evaluation.report import markdown_table, read_output
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.orthogonal import hadamard, paley_1, paley_2, rotation_matrix, sylvester
from tritonq.engine.rotation import RotationSpec, rotate_heads, rotate_model
from tritonq.errors import TritonqError

LLAMA_LIKE = [f for f in FAMILIES if f != "opt"]


@pytest.mark.parametrize("n, how", [(12, "Paley I (GF(11)) 12"), (20, "Paley I (GF(19)) 20"),
                                    (28, "Paley II (GF(13)) 28"), (36, "Paley II (GF(17)) 36"),
                                    (64, "Sylvester 64"), (96, "Paley I (GF(11)) 12 x Sylvester 8"),
                                    (576, "Paley II (GF(17)) 36 x Sylvester 16"),
                                    (1536, "Paley I (GF(11)) 12 x Sylvester 128")])
def test_hadamard_constructions(n, how):
    h, built = hadamard(n)
    assert built == how
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_paley_and_sylvester_directly():
    assert torch.equal(sylvester(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    for h, n in ((paley_1(7), 8), (paley_1(23), 24), (paley_2(5), 12), (paley_2(29), 60)):
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    with pytest.raises(TritonqError, match="power-of-two"):
        sylvester(12)


@pytest.mark.parametrize("n", [6, 10, 92])
def test_no_construction(n):
    assert hadamard(n) is None  # 6 and 10 have no Hadamard matrix; 92 has one, but not by these constructions


@pytest.mark.parametrize("n, asked, kind", [(576, "hadamard", "hadamard"), (64, "hadamard", "hadamard"),
                                             (2048, "hadamard", "hadamard"), (36, "hadamard", "hadamard"),
                                             (92, "hadamard", "random"), (576, "random", "random"),
                                             (64, "random", "random")])
def test_rotations_are_orthogonal(n, asked, kind):
    built = rotation_matrix(n, asked, torch.Generator().manual_seed(n))
    q = built.matrix
    assert q.dtype == torch.float64
    assert built.kind == kind
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert (q.T @ q - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    if kind == "hadamard":  # every entry +-1/sqrt(n): the mass of each channel spread evenly
        assert torch.allclose(q.abs(), torch.full_like(q, n**-0.5), rtol=0, atol=1e-15)
    else:
        assert q.abs().max() > 2 * n**-0.5  # not a Hadamard matrix in disguise
    if n == 92:
        assert "no Hadamard construction of order 92" in built.construction


def test_signs_follow_the_seed():
    a = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(0)).matrix
    b = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(0)).matrix
    c = rotation_matrix(576, "hadamard", torch.Generator().manual_seed(1)).matrix
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.abs(), c.abs())  # the same Hadamard matrix, other signs


def test_bad_spec():
    with pytest.raises(TritonqError, match="unknown --rotate 'hadamrd'"):
        RotationSpec("hadamrd")
    with pytest.raises(TritonqError, match="--rotate-seed"):
        RotationSpec("hadamard", -1)
    with pytest.raises(TritonqError, match="nothing to rotate"):
        rotate_model(nn.Linear(2, 2), None, RotationSpec())


def _model(path, family, **overrides):
    from transformers import AutoModelForCausalLM

    make_family_model(path, family, **overrides)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _randomize(model, seed=1):
    """Random-init norms are ones and biases zeros, which would hide a wrong fold or bias rotation."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.data.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        elif name.endswith(".bias"):
            p.data.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))


def _ids(vocab=256, n=2, seqlen=40, seed=3):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


@pytest.mark.parametrize("kind", ["hadamard", "random"])
@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_rotated_model_keeps_float64_logits(tmp_path, family, kind):
    model = _model(tmp_path / family, family)
    _randomize(model)
    adapter = adapter_for(model.config)
    v_before = adapter.block_list(model)[0].get_submodule(adapter.value_pair.smooth).weight.detach().clone()
    before = _logits(model)
    record = rotate_model(model, adapter, RotationSpec(kind, seed=4))
    assert before.abs().max() > 0.1
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    assert record.residual.matrix.shape == (64, 64) and record.heads.matrix.shape[0] == adapter.geometry(
        model.config).head_dim
    assert record.residual.kind == kind
    v_after = adapter.block_list(model)[0].get_submodule(adapter.value_pair.smooth).weight
    assert (v_after - v_before).abs().max() > 0.05  # the values really moved


def test_width_without_power_of_two_and_tied(tmp_path):
    """hidden 96 = Paley I(11) 12 x 8, head_dim 24 = 12 x 2, tied embeddings, GQA 4:2, biases on every linear."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=256,
                         tie_word_embeddings=True, attention_bias=True, mlp_bias=True)  # writers with biases
    model = LlamaForCausalLM(config).double().eval()
    _randomize(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _logits(model)
    record = rotate_model(model, adapter_for(model.config), RotationSpec("hadamard", seed=2))
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    assert record.describe()["residual"] == {"size": 96, "kind": "hadamard",
                                             "construction": "Paley I (GF(11)) 12 x Sylvester 8, random signs"}
    assert record.describe()["heads"]["construction"] == "Paley I (GF(11)) 12 x Sylvester 2, random signs"
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings


def test_value_heads_need_their_o_proj(tmp_path):
    """The invariance check can fail: rotating the values without the matching o_proj columns moves the logits."""
    model = _model(tmp_path / "llama", "llama")
    _randomize(model)
    adapter = adapter_for(model.config)
    before = _logits(model)
    h = rotation_matrix(16, "hadamard", torch.Generator().manual_seed(0)).matrix
    saved_o = [b.self_attn.o_proj.weight.detach().clone() for b in adapter.block_list(model)]
    rotate_heads(model, adapter, h)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    for block, o in zip(adapter.block_list(model), saved_o):
        block.self_attn.o_proj.weight.data.copy_(o)
    assert (_logits(model) - before).abs().max() > 1e-2


def test_opt_refused_before_loading(tmp_path):
    src = make_family_model(tmp_path / "opt", "opt")
    with pytest.raises(TritonqError, match="--rotate needs RMSNorm models: opt's LayerNorm subtracts the mean"):
        quantize(QuantizeOptions(output=str(tmp_path / "out"), model=str(src), method="rtn", bits=4, group_size=32,
                                 rotate="hadamard", device="cpu", progress=False))
    assert not (tmp_path / "out").exists()


def test_options_refused(tmp_path):
    src = make_family_model(tmp_path / "llama", "llama")
    base = dict(output=str(tmp_path / "out"), model=str(src), bits=4, group_size=32, device="cpu", progress=False)
    with pytest.raises(TritonqError, match="unknown --rotate 'hadamrd'"):
        quantize(QuantizeOptions(**base, method="rtn", rotate="hadamrd"))
    with pytest.raises(TritonqError, match="cannot be streamed"):
        quantize(QuantizeOptions(**base, method="rtn", rotate="hadamard", stream=True))
    with pytest.raises(TritonqError, match="--method auto"):
        quantize(QuantizeOptions(**base, method="auto", rotate="hadamard"))


def _saved_tied_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=256, bos_token_id=256,
                         eos_token_id=257, pad_token_id=258, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    _randomize(model)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_quantize_rotates_records_and_reports(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src = _saved_tied_llama(tmp_path / "src")
    out = tmp_path / "rtn-hadamard"
    quantize(QuantizeOptions(output=str(out), model=str(src), method="rtn", bits=4, group_size=32, rotate="hadamard",
                             rotate_seed=3, device="cpu", dtype="float32", progress=True))
    assert "rotate hadamard (seed 3): residual stream 64 = Sylvester 64, random signs" in capsys.readouterr().out
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["rotate"] == "hadamard"
    signs = "random signs"
    assert meta["rotation"] == {"seed": 3,
                                "residual": {"size": 64, "kind": "hadamard", "construction": f"Sylvester 64, {signs}"},
                                "heads": {"size": 16, "kind": "hadamard", "construction": f"Sylvester 16, {signs}"}}
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = _logits(reference)
    adapter = adapter_for(reference.config)
    rotate_model(reference, adapter, RotationSpec("hadamard", 3))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    spec = GridSpec(bits=4, group_size=32)
    for i, block in enumerate(adapter.block_list(reference)):  # RTN of the rotated weights, through the pipeline
        for name in adapter.linear_names():
            want = round_to_nearest(block.get_submodule(name).weight.data, spec, name).weight
            got = saved.get_submodule(f"{adapter.blocks}.{i}.{name}").weight
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(saved.lm_head.weight, reference.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(saved.model.embed_tokens.weight, reference.model.embed_tokens.weight, rtol=0, atol=0)
    assert not saved.config.tie_word_embeddings
    got = _logits(saved)
    assert float((got - original).pow(2).mean() / original.pow(2).mean()) < 0.05  # the same model, 4-bit noise apart

    plain = tmp_path / "rtn"
    quantize(QuantizeOptions(output=str(plain), model=str(src), method="rtn", bits=4, group_size=32, device="cpu",
                             progress=False))
    assert "rotate" not in json.loads((plain / "quantization.json").read_text())
    table = markdown_table([read_output(plain), read_output(out)])
    header, _, row_plain, row_rot = table.splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[cols.index("activations") + 1] == "rotate"
    assert [c.strip() for c in row_plain.strip("|").split("|")][cols.index("rotate")] == "none"
    assert [c.strip() for c in row_rot.strip("|").split("|")][cols.index("rotate")] == "hadamard seed 3"
    assert "rotate" not in markdown_table([read_output(plain)])  # no rotated output: no column


def test_gptq_w4a8_rotated_packs_and_loads(tmp_path, calib_file):
    """GPTQ with per-token 8-bit activations on the rotated model, packed as compressed-tensors: the packed model
    evaluates as its fake-quantized twin."""
    from tritonq.engine.api import load_evaluation_model

    src = make_family_model(tmp_path / "src", "qwen2")  # q/k/v biases: the reading linears keep theirs
    common = dict(model=str(src), method="gptq", bits=4, group_size=32, act_bits=8, rotate="random",
                  calib=str(calib_file), nsamples=8, seqlen=64, device="cpu", dtype="float32", progress=False)
    quantize(QuantizeOptions(output=str(tmp_path / "fake"), **common))
    quantize(QuantizeOptions(output=str(tmp_path / "ct"), out_format="compressed-tensors", **common))
    fake = load_evaluation_model(str(tmp_path / "fake"), torch.device("cpu"), torch.float32)
    packed = load_evaluation_model(str(tmp_path / "ct"), torch.device("cpu"), torch.float32)
    a, b = _logits(fake), _logits(packed)
    assert a.abs().max() > 0.1
    assert float((a - b).pow(2).mean() / a.pow(2).mean()) < 1e-4
    assert json.loads((tmp_path / "ct" / "quantization.json").read_text())["rotate"] == "random"


def test_cli_flags(tmp_path, capsys):
    from tritonq.cli import main

    src = make_family_model(tmp_path / "src", "mistral")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--rotate",
                 "random", "--rotate-seed", "2", "--output", str(out), "--device", "cpu", "--no-progress"]) == 0
    meta = json.loads((out / "quantization.json").read_text())
    assert (meta["rotate"], meta["rotation"]["seed"], meta["rotation"]["residual"]["kind"]) == ("random", 2, "random")
    opt = make_family_model(tmp_path / "opt", "opt")
    assert main(["quantize", "--model", str(opt), "--method", "rtn", "--rotate", "hadamard", "--output",
                 str(tmp_path / "opt-out"), "--device", "cpu", "--no-progress"]) == 2
    assert "--rotate needs RMSNorm models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--rotate", "hadamrd", "--output", str(tmp_path / "x")])


def test_recipe_replay_needs_the_same_rotation(tmp_path):
    """``--recipe OUT/quantization.json`` replays a run's methods and grids; a rotated run only with its rotation."""
    src = make_family_model(tmp_path / "src", "llama")
    base = dict(model=str(src), bits=4, group_size=32, device="cpu", progress=False)
    recipe = {"default": {"method": "rtn"}, "rules": [{"match": "mlp", "bits": 8}]}
    quantize(QuantizeOptions(output=str(tmp_path / "first"), recipe=recipe, rotate="hadamard", rotate_seed=1, **base))
    with pytest.raises(TritonqError, match="replays a run made with --rotate hadamard --rotate-seed 1"):
        quantize(QuantizeOptions(output=str(tmp_path / "bare"), recipe=str(tmp_path / "first"), **base))
    with pytest.raises(TritonqError, match="--rotate-seed 1"):
        quantize(QuantizeOptions(output=str(tmp_path / "seed"), recipe=str(tmp_path / "first"), rotate="hadamard",
                                 **base))
    quantize(QuantizeOptions(output=str(tmp_path / "again"), recipe=str(tmp_path / "first" / "quantization.json"),
                             rotate="hadamard", rotate_seed=1, **base))
    from safetensors.torch import load_file

    first, again = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("first", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
