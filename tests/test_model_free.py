"""Model-free RTN (``engine/model_free.py``): shards in, output out, no model built, bytes as the pipeline's.

The pipeline path is today's reference: the same ``quantize`` call with the model-free dispatch switched off.
For every format the files must be byte-identical (``quantization.json`` apart from its stage times and the
``model_free`` mark). A bf16 checkpoint keeps bf16 float tensors model-free (``--dtype auto``), so there the
packed codes, scales and zeros are compared; with ``--dtype float32`` the bytes are identical again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_gguf import bpe_tokenizer, gguf_export_config
from tritonq.engine import model_free
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.formats.registry import read_packed
from tritonq.errors import TritonqError

FORMATS = ["fake", "compressed-tensors", "gptq", "gptq_v2", "awq", "gguf"]
PACKED = FORMATS[1:5]


def _config(**overrides):
    config = gguf_export_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _save_model(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **config) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(**config)).to(dtype)
    with torch.no_grad():  # norms away from 1 and a bias-free model of random scale: every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("mf") / "fp32", torch.float32, seed=1)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("mf") / "bf16", torch.bfloat16, seed=2)


def _run(model: Path, out: Path, fmt: str, *, model_free_on: bool, monkeypatch, **kw) -> Path:
    sym = kw.pop("sym", fmt == "gptq")  # gptq v1 cannot hold the asymmetric zero point 0
    opts = QuantizeOptions(output=str(out), model=str(model), method="rtn", bits=4, group_size=32, sym=sym,
                           out_format=fmt, device="cpu", progress=False, **kw)
    with monkeypatch.context() as m:
        if not model_free_on:
            m.setattr(model_free, "applies", lambda *a: None)
        else:
            calls = []
            real = model_free.quantize_model_free
            m.setattr(model_free, "quantize_model_free", lambda *a, **k: calls.append(1) or real(*a, **k))
        quantize(opts)
    if model_free_on:
        assert calls, "the model-free path was not taken"
    return out


def _digests(out: Path) -> dict[str, str]:
    found = {}
    for f in sorted(out.iterdir()):
        data = f.read_bytes()
        if f.name == "quantization.json":
            record = {k: v for k, v in json.loads(data).items() if k not in ("seconds", "model_free", "memory")}
            data = json.dumps(record, sort_keys=True).encode()
        found[f.name] = hashlib.sha256(data).hexdigest()
    return found


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp32_output_is_byte_identical_to_the_pipeline(tmp_path, fp32_dir, fmt, monkeypatch):
    ref = _run(fp32_dir, tmp_path / "pipeline", fmt, model_free_on=False, monkeypatch=monkeypatch, dtype="float32")
    got = _run(fp32_dir, tmp_path / "free", fmt, model_free_on=True, monkeypatch=monkeypatch)
    assert _digests(got) == _digests(ref)
    assert json.loads((got / "quantization.json").read_text())["model_free"] is True


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors", "gguf"])
def test_bf16_is_byte_identical_to_the_streamed_pipeline(tmp_path, bf16_dir, fmt, monkeypatch):
    """Both keep the checkpoint's bf16 for the float part and round in the compute dtype (fp32 here)."""
    ref = _run(bf16_dir, tmp_path / "pipeline", fmt, model_free_on=False, monkeypatch=monkeypatch, dtype="float32")
    got = _run(bf16_dir, tmp_path / "free", fmt, model_free_on=True, monkeypatch=monkeypatch, dtype="float32")
    assert _digests(got) == _digests(ref)
    if fmt != "gguf":  # a GGUF file carries its own types
        assert json.loads((got / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("fmt", PACKED)
def test_bf16_keeps_its_dtype_and_the_packed_codes(tmp_path, bf16_dir, fmt, monkeypatch):
    """``--dtype auto`` keeps bf16 float tensors; codes, scales and zeros agree with an fp32 pipeline run's."""
    ref = _run(bf16_dir, tmp_path / "pipeline", fmt, model_free_on=False, monkeypatch=monkeypatch, dtype="float32")
    got = _run(bf16_dir, tmp_path / "free", fmt, model_free_on=True, monkeypatch=monkeypatch)
    theirs = {name: q for name, _, q in read_packed(ref)}
    ours = {name: q for name, _, q in read_packed(got)}
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, q in ours.items():
        assert torch.equal(q.codes, theirs[name].codes), name
        assert torch.equal(q.scale, theirs[name].scale) and torch.equal(q.zero, theirs[name].zero), name
        assert torch.equal(q.g_idx, theirs[name].g_idx), name
    tensors = load_file(str(got / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    source = load_file(str(bf16_dir / "model.safetensors"))
    assert torch.equal(tensors["model.norm.weight"], source["model.norm.weight"])
    assert json.loads((got / "quantization.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((got / "config.json").read_text())["dtype"] == "bfloat16"


def test_bf16_fake_weights_are_the_grid_points_rounded_to_bf16(tmp_path, bf16_dir, monkeypatch):
    ref = _run(bf16_dir, tmp_path / "pipeline", "fake", model_free_on=False, monkeypatch=monkeypatch,
               dtype="float32")
    got = _run(bf16_dir, tmp_path / "free", "fake", model_free_on=True, monkeypatch=monkeypatch)
    ours, theirs = load_file(str(got / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    w = "model.layers.1.mlp.down_proj.weight"
    assert ours[w].dtype == theirs[w].dtype == torch.bfloat16  # the streamed pipeline keeps bf16 too
    assert torch.equal(ours[w], theirs[w])
    assert not torch.equal(ours[w].float(), load_file(str(bf16_dir / "model.safetensors"))[w].float())
    params = [load_file(str(d / "quant_params.safetensors")) for d in (got, ref)]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])


def test_no_model_is_built(tmp_path, fp32_dir, monkeypatch):
    from transformers import AutoModelForCausalLM
    from tritonq.engine import model_io

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(model_io, "load_model", refuse)
    out = _run(fp32_dir, tmp_path / "free", "compressed-tensors", model_free_on=True, monkeypatch=monkeypatch)
    assert len(list(read_packed(out))) == 14


@pytest.mark.parametrize("fmt", ["fake", "compressed-tensors", "gguf"])
def test_workers_do_not_change_the_bytes(tmp_path, fp32_dir, fmt, monkeypatch):
    one = _run(fp32_dir, tmp_path / "one", fmt, model_free_on=True, monkeypatch=monkeypatch)
    three = _run(fp32_dir, tmp_path / "three", fmt, model_free_on=True, monkeypatch=monkeypatch, workers=3)
    assert _digests(three) == _digests(one)


def test_mse_grid_sharded_source_and_tied_embeddings(tmp_path, monkeypatch):
    """A data-free grid search (--mse), a source in several shards with an index, tied embeddings."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    src = tmp_path / "tied"
    LlamaForCausalLM(_config(tie_word_embeddings=True)).save_pretrained(src, max_shard_size="40KB")
    bpe_tokenizer().save_pretrained(src)
    assert (src / "model.safetensors.index.json").is_file()
    ref = _run(src, tmp_path / "pipeline", "fake", model_free_on=False, monkeypatch=monkeypatch, dtype="float32",
               mse=True)
    got = _run(src, tmp_path / "free", "fake", model_free_on=True, monkeypatch=monkeypatch, mse=True, workers=2)
    assert _digests(got) == _digests(ref)
    assert "lm_head.weight" not in load_file(str(got / "model.safetensors"))


def test_bad_workers_and_calibrated_methods(tmp_path, fp32_dir, monkeypatch):
    with pytest.raises(TritonqError, match="--workers must be at least 1"):
        _run(fp32_dir, tmp_path / "bad", "fake", model_free_on=True, monkeypatch=monkeypatch, workers=0)
    from tritonq.engine.methods.registry import make_method

    gptq = make_method("gptq", None)
    assert model_free.applies(gptq, None, str(fp32_dir)) is None  # calibrated: the pipeline runs it
    assert model_free.streamable_directory("smollm2") is None  # the offline default is a GGUF file, not shards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [dict(bits=4, group_size=32), dict(bits=4, group_size=-1, sym=True),
                                  dict(bits=3, group_size=16, mse=True), dict(bits=8, group_size=64, sym=True)])
def test_rows_in_steps_give_rtn_of_the_whole_weight(tmp_path, dtype, grid, monkeypatch):
    """Rounded a few rows at a time (7 or 3: not divisors of any width), every layer is RTN of the whole weight,
    and its record is exactly what ``QuantizedWeight.from_grid`` recovers from the checkpoint-dtype weight."""
    from transformers import AutoConfig
    from tritonq.engine.formats.records import QuantizedWeight
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.methods.rtn import round_to_nearest

    monkeypatch.setattr(model_free, "ELEMENTS_PER_STEP", 7 * 64)  # 7 rows of the 64-wide layers, 3 of down_proj
    src = _save_model(tmp_path / "m", dtype, seed=int(torch.randint(0, 1000, (1,))))
    source = load_file(str(src / "model.safetensors"))
    spec = GridSpec(**grid)
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "mlp.down_proj")]
    ckpt = model_free.ShardCheckpoint(src, AutoConfig.from_pretrained(src), {n: spec for n in names}, {}, None,
                                      workers=2, progress=False)
    try:
        for name in names:
            whole = round_to_nearest(source[f"{name}.weight"].float(), spec, name)
            weight = ckpt.tensor(f"{name}.weight")
            assert weight.dtype == dtype and torch.equal(weight, whole.weight.to(dtype)), name
            scale, zero, g_idx = ckpt.params(name)
            assert torch.equal(scale, whole.scale) and torch.equal(zero, whole.zero), name
            assert torch.equal(g_idx, whole.g_idx.to(torch.int32)), name
            want = QuantizedWeight.from_grid(name, weight, scale, zero, g_idx, spec)
            got = ckpt.record(name)
            assert torch.equal(got.codes, want.codes) and got.codes.dtype == torch.uint8, name
            assert int(got.codes.max()) > 0
    finally:
        ckpt.close()
