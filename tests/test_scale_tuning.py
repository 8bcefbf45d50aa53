"""End-to-end scale tuning (``--tune-epochs``, engine/scale_tuning.py): the loss against a float64 reference, the
scales' gradient against finite differences, a run that lowers the KL with the codes and zeros unchanged and the
weights on the tuned grid in every format, the work directory's tuned files, and bad settings refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_tokenizer
from safetensors.torch import load_file
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.grid import GridSpec, codes_of
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.scale_tuning import ScaleTuning, _kl, _last_hidden, _TunedLinear, _VectorFactor
from tritonq.errors import TritonqError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tune") / "model"
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config())
    with torch.no_grad():  # larger weights than the init's: a peaked next-token distribution, a KL worth tuning
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _opts(model_dir, calib_file, out, **kw) -> QuantizeOptions:
    base = dict(output=str(out), model=str(model_dir), method="rtn", bits=2, group_size=32, calib=str(calib_file),
                nsamples=8, seqlen=64, device="cpu", dtype="float32", progress=False)
    return QuantizeOptions(**{**base, **kw})


def _linear_on_grid(seed: int, bits: int = 2):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(96, 40, bias=True)
    res = round_to_nearest(lin.weight.detach(), GridSpec(bits=bits, group_size=32))
    with torch.no_grad():
        lin.weight.copy_(res.weight)
    return lin, res.scale, res.zero, res.g_idx


def test_tuned_linear_starts_on_the_methods_grid():
    lin, scale, zero, g_idx = _linear_on_grid(0)
    before = lin.weight.detach().clone()
    wrapped = _TunedLinear(lin, scale, zero, g_idx, 2)
    x = torch.randn(5, 96)
    assert torch.equal(wrapped.weight_on(wrapped.scale()), before)  # factor 0: the same weights
    torch.testing.assert_close(wrapped(x), F.linear(x, before, lin.bias), rtol=0, atol=0)
    assert torch.equal(wrapped.final_scale(), scale)  # the grid's scales are fp16 values already
    with torch.no_grad():
        wrapped.factor.uniform_(-0.2, 0.2)
    final = wrapped.final_scale()
    assert torch.equal(final, final.half().float()) and not torch.equal(final, scale)


def test_kl_matches_a_float64_reference():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    student, teacher = torch.randn(7, 16) * 3, torch.randn(7, 16) * 3
    got = _kl(student, teacher, head)
    s = torch.log_softmax(student.double() @ head.weight.double().T, -1)
    t = torch.log_softmax(teacher.double() @ head.weight.double().T, -1)
    ref = (t.exp() * (t - s)).sum(-1).mean()
    assert ref > 0.1
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    assert _kl(teacher, teacher, head).abs() < 1e-5


def test_scale_gradient_matches_finite_differences(model_dir):
    """The factors' gradient through the whole model, the scales' and a norm's: the directional derivative of the KL.
    (float64, but Llama's RMSNorm computes in float32, hence a central difference of 1e-3 and a tolerance of 1e-3.)"""
    from torch.nn.utils import parametrize
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = torch.randint(0, 256, (1, 24))
    teacher = _last_hidden(model, "lm_head", ids)[0].detach()
    names = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    wrapped = []
    for name in names:
        lin = model.get_submodule(name)
        res = round_to_nearest(lin.weight.detach().float(), GridSpec(bits=2, group_size=32))
        with torch.no_grad():
            lin.weight.copy_(res.weight.double())
        w = _TunedLinear(lin, res.scale.double(), res.zero.double(), res.g_idx, 2)
        w.s0, w.centered = w.s0.double(), w.centered.double()
        w.factor = torch.nn.Parameter(torch.zeros_like(w.s0))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, w)
        wrapped.append(w)
    for p in model.parameters():
        p.requires_grad_(False)
    norm = model.get_submodule("model.layers.1.input_layernorm")
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # not all ones: a factor on 1 would test less
    parametrize.register_parametrization(norm, "weight", _VectorFactor(norm.weight))
    factors = [w.factor for w in wrapped] + [norm.parametrizations.weight[0].factor]
    for f in factors:
        f.requires_grad_(True)

    def loss():
        return _kl(_last_hidden(model, "lm_head", ids)[0], teacher, model.lm_head)

    loss().backward()
    direction = [torch.randn_like(f) for f in factors]
    analytic = sum((f.grad * d).sum() for f, d in zip(factors, direction))
    eps = 1e-3
    with torch.no_grad():
        for f, d in zip(factors, direction):
            f.add_(eps * d)
        up = loss()
        for f, d in zip(factors, direction):
            f.sub_(2 * eps * d)
        down = loss()
    numeric = (up - down) / (2 * eps)
    assert analytic.abs() > 1e-4
    torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=0)


def test_tuning_lowers_the_kl_and_keeps_codes_and_zeros(model_dir, calib_file, tmp_path):
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    quantize(_opts(model_dir, calib_file, plain))
    quantize(_opts(model_dir, calib_file, tuned, tune_epochs=3, tune_lr=0.02, tune_batch=2))
    meta = json.loads((tuned / "quantization.json").read_text())
    log = meta["scale_tuning"]
    assert log["epochs"] == 3 and log["steps"] == 12 and len(log["train_kl"]) == 3
    assert log["kl_end"] < 0.8 * log["kl_start"], log
    assert "scale_tuning" not in json.loads((plain / "quantization.json").read_text())
    w_plain, w_tuned = load_file(plain / "model.safetensors"), load_file(tuned / "model.safetensors")
    q_plain, q_tuned = load_file(plain / "quant_params.safetensors"), load_file(tuned / "quant_params.safetensors")
    names = sorted({k.rsplit(".", 1)[0] for k in q_tuned})
    assert len(names) == 14
    moved = 0
    for name in names:
        scale, zero, g_idx = (q_tuned[f"{name}.{leaf}"].float() for leaf in ("scale", "zero", "g_idx"))
        weight = w_tuned[f"{name}.weight"]
        codes = codes_of(weight, scale, zero, g_idx, 3)
        idx = g_idx.long()
        assert torch.equal(scale[:, idx] * (codes.float() - zero[:, idx]), weight)  # on the tuned grid exactly
        assert torch.equal(scale, scale.half().float())
        p_scale = q_plain[f"{name}.scale"].float()
        assert torch.equal(codes, codes_of(w_plain[f"{name}.weight"], p_scale, q_plain[f"{name}.zero"].float(),
                                           g_idx, 3))
        assert torch.equal(zero, q_plain[f"{name}.zero"].float())
        moved += int(not torch.equal(scale, p_scale))
    assert moved == len(names)
    # the blocks' norms are tuned too (--tune-norms, the default); the embedding, final norm and head stay
    norms = [k for k in w_plain if k.startswith("model.layers.") and k.endswith("norm.weight")]
    assert len(norms) == 4
    for key in w_plain:
        if not any(key == f"{n}.weight" for n in names):
            assert torch.equal(w_plain[key], w_tuned[key]) != (key in norms), key


def test_no_tune_norms_keeps_every_float_tensor(model_dir, calib_file, tmp_path):
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    quantize(_opts(model_dir, calib_file, plain))
    quantize(_opts(model_dir, calib_file, tuned, tune_epochs=1, tune_lr=0.02, tune_norms=False))
    assert json.loads((tuned / "quantization.json").read_text())["scale_tuning"]["norms"] is False
    w_plain, w_tuned = load_file(plain / "model.safetensors"), load_file(tuned / "model.safetensors")
    quantized = {k.rsplit(".", 1)[0] + ".weight" for k in load_file(tuned / "quant_params.safetensors")}
    floats = [k for k in w_plain if k not in quantized]
    assert len(floats) == 7  # 4 block norms, the final norm, the embedding, the head
    for key in floats:
        assert torch.equal(w_plain[key], w_tuned[key]), key
    assert any(not torch.equal(w_plain[k], w_tuned[k]) for k in quantized)


def test_a_packed_format_holds_the_tuned_scales(model_dir, calib_file, tmp_path):
    from tritonq.engine.formats.registry import read_packed

    kw = dict(tune_epochs=1, tune_lr=0.02, tune_batch=4, bits=4)
    quantize(_opts(model_dir, calib_file, tmp_path / "fake", **kw))
    quantize(_opts(model_dir, calib_file, tmp_path / "gptq", out_format="gptq", **kw))
    fake = load_file(tmp_path / "fake" / "model.safetensors")
    records = list(read_packed(tmp_path / "gptq"))
    assert len(records) == 14
    for name, _spec, record in records:
        assert torch.equal(record.dequantize(), fake[f"{name}.weight"]), name


def test_work_dir_reads_tuned_files_only_for_the_same_settings(tmp_path):
    from tritonq.engine.methods.base import LayerResult
    from tritonq.engine.workdir import WorkDir

    work = WorkDir(tmp_path / "w", {"run": 1}, resume=False, overwrite=False)
    lin, scale, zero, g_idx = _linear_on_grid(4)
    spec = GridSpec(bits=2, group_size=32)
    work.commit_block(0, {"b.0.w": lin.weight.detach()}, {"b.0.w": LayerResult(lin.weight, scale, zero, g_idx,
                                                                                spec=spec)}, {}, None)
    settings = ScaleTuning(2).describe()
    work.commit_tuned(settings, {0: ({"b.0.w": lin.weight.detach() * 2},
                                     {"b.0.w": LayerResult(lin.weight, scale * 2, zero, g_idx, spec=spec)})},
                      {"kl_start": 1.0})
    assert torch.equal(work.block_tensors(0)["b.0.w"], lin.weight * 2)
    again = WorkDir(tmp_path / "w", {"run": 1}, resume=True, overwrite=False)
    assert again.use_tuned(settings) and torch.equal(again.layer_params(0, "b.0.w")[0], scale * 2)
    assert again.tuned_log() == {"kl_start": 1.0}
    other = WorkDir(tmp_path / "w", {"run": 1}, resume=True, overwrite=False)
    assert not other.use_tuned(ScaleTuning(3).describe())
    assert torch.equal(other.block_tensors(0)["b.0.w"], lin.weight) and torch.equal(other.layer_params(0, "b.0.w")[0],
                                                                                   scale)
    assert not WorkDir(tmp_path / "w", {"run": 1}, resume=True, overwrite=False).use_tuned(settings)  # marker gone


@pytest.mark.parametrize("kw, message", [
    ({"tune_epochs": -1}, "--tune-epochs must be a whole number"),
    ({"tune_epochs": 1, "tune_lr": 0.0}, "--tune-lr must be a positive number"),
    ({"tune_epochs": 1, "tune_lr": float("nan")}, "--tune-lr must be a positive number"),
    ({"tune_epochs": 1, "tune_batch": 0}, "--tune-batch must be a whole number"),
    ({"tune_epochs": 1, "stream": True}, "cannot be streamed"),
    ({"tune_epochs": 1, "act_bits": 8}, "weight-only model"),
])
def test_bad_settings_are_refused_before_any_output(model_dir, calib_file, tmp_path, kw, message):
    out = tmp_path / "out"
    with pytest.raises(TritonqError, match=message):
        quantize(_opts(model_dir, calib_file, out, **kw))
    assert not out.exists()


def test_cli_flags_reach_the_run(model_dir, calib_file, tmp_path, capsys):
    from tritonq.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "3", "--group-size", "32",
                 "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--tune-epochs", "1",
                 "--tune-lr", "0.01", "--tune-batch", "2", "--no-tune-norms", "--output", str(out)]) == 0
    assert "scale tuning: epoch 1/1" in capsys.readouterr().out
    log = json.loads((out / "quantization.json").read_text())["scale_tuning"]
    assert (log["epochs"], log["lr"], log["batch"], log["steps"], log["norms"]) == (1, 0.01, 2, 2, False)


def test_a_non_finite_gradient_stops_the_tuning_and_leaves_the_weights(model_dir):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.scale_tuning import block_vectors, teacher_states, tune_scales

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name = "model.layers.0.mlp.down_proj"
    res = round_to_nearest(model.get_submodule(name).weight.detach(), GridSpec(bits=2, group_size=32))
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(res.weight)
    batches = [torch.randint(0, 256, (2, 16))]
    teacher = teacher_states(model, "lm_head", batches, torch.device("cpu"))
    teacher[1][3, 0] = float("nan")
    vectors = block_vectors(model, "model.layers")
    assert len(vectors) == 4  # the blocks' norms (no biases in Llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in vectors}
    with pytest.raises(TritonqError, match="non-finite gradient"):
        tune_scales(model, "lm_head", {name: (res.scale, res.zero, res.g_idx, 2)}, batches, teacher,
                    ScaleTuning(1), torch.device("cpu"), vectors=vectors)
    assert isinstance(model.get_submodule(name), torch.nn.Linear)
    assert torch.equal(model.get_submodule(name).weight, res.weight)
    params = dict(model.named_parameters())  # the norms' own parameters again (no parametrization left)
    assert all(torch.equal(params[n], v) for n, v in before.items())
    assert all(p.requires_grad for p in model.parameters())
