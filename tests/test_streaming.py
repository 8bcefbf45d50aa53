"""Streaming a checkpoint from disk (engine/streaming.py): the same output as the model held whole, block by block,
in the checkpoint's dtype, with the activation cache on the device, in RAM or on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.outputs import QUANT_JSON
from tritonq.errors import TritonqError


def _save(path: Path, dtype: str = "float32", tie: bool = False, seed: int = 0) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=3, dtype=dtype, tie_word_embeddings=tie))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _run(model: Path, out: Path, **kw) -> tuple[Path, object]:
    opts = dict(output=str(out), model=str(model), method="gptq", nsamples=8, seqlen=64, group_size=32,
                overwrite=True, progress=False, eval_data="pydoc", eval_windows=2, eval_seqlen=64)
    opts.update(kw)
    return out, quantize(QuantizeOptions(**opts))


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())
            if f.is_file() and f.name != QUANT_JSON}


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("fp32") / "model")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_equals_in_memory(fp32_dir, tmp_path, method):
    """Every file byte for byte, and the perplexity after quantize to the last bit (float32 checkpoint)."""
    memory, s_mem = _run(fp32_dir, tmp_path / "memory", method=method, stream=False)
    streamed, s_str = _run(fp32_dir, tmp_path / "streamed", method=method, stream=True)
    assert _digests(memory) == _digests(streamed)
    assert s_mem.perplexity == s_str.perplexity
    meta = json.loads((streamed / QUANT_JSON).read_text())
    assert meta["memory"]["weights"] == "streamed from disk"
    assert [b["block"] for b in meta["memory"]["per_block"]] == [0, 1, 2]
    assert all(b["host_peak_mb"] > 0 for b in meta["memory"]["per_block"])
    assert not (tmp_path / "streamed.tritonq-work").exists()  # a finished run cleans its work directory


def test_streamed_never_loads_the_whole_model(fp32_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*_a, **_k):
        raise AssertionError("the whole model was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    out, summary = _run(fp32_dir, tmp_path / "out", out_format="compressed-tensors")
    assert summary.perplexity > 1 and (out / "model.safetensors").is_file()


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    """The float part keeps bf16 (computing in fp32); the grids equal the in-memory fp32 run's, and the output
    packs (every quantized weight is a bf16 rounding of its grid point)."""
    from safetensors import safe_open
    from tritonq.engine.formats.registry import save_packed

    src = _save(tmp_path / "bf16", dtype="bfloat16", tie=True)
    memory, _ = _run(src, tmp_path / "memory", stream=False)
    streamed, _ = _run(src, tmp_path / "streamed", stream=True)
    with safe_open(str(streamed / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        assert "lm_head.weight" not in f.keys()  # tied, as save_pretrained writes it
    assert dtypes == {torch.bfloat16}
    assert json.loads((streamed / "config.json").read_text())["dtype"] == "bfloat16"
    assert _digests(memory)["quant_params.safetensors"] == _digests(streamed)["quant_params.safetensors"]
    save_packed(str(streamed), str(tmp_path / "ct"), "compressed-tensors")
    assert (tmp_path / "ct" / "model.safetensors").is_file()


@pytest.mark.parametrize("place", ["cpu", "disk"])
def test_offloaded_activations_change_nothing(fp32_dir, tmp_path, place):
    base, _ = _run(fp32_dir, tmp_path / "device", stream=True, eval_data=None, eval_windows=None)
    kw = {"activations_dir": str(tmp_path / "acts")} if place == "disk" else {}
    out, _ = _run(fp32_dir, tmp_path / place, stream=True, eval_data=None, eval_windows=None,
                  offload_activations=place, **kw)
    assert _digests(base) == _digests(out)
    if place == "disk":  # the mapped files are unlinked as soon as they are made
        assert list((tmp_path / "acts").iterdir()) == []


def test_offload_disk_needs_a_directory(fp32_dir, tmp_path):
    with pytest.raises(TritonqError, match="disk DIR"):
        _run(fp32_dir, tmp_path / "out", offload_activations="disk")


def test_checkpoint_missing_a_tensor_fails_before_calibration(tmp_path):
    from safetensors.torch import load_file, save_file

    src = _save(tmp_path / "model")
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TritonqError, match="model.layers.2.mlp.down_proj.weight.*not in the checkpoint"):
        _run(src, tmp_path / "out", stream=True)
    assert not (tmp_path / "out").exists()


def test_sharded_checkpoint_streams(tmp_path):
    """A checkpoint in several shards with an index streams like a single file."""
    from transformers import AutoModelForCausalLM

    src = _save(tmp_path / "single")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, s1 = _run(src, tmp_path / "one", stream=True)
    many, s2 = _run(tmp_path / "sharded", tmp_path / "many", stream=True)
    assert _digests(one)["model.safetensors"] == _digests(many)["model.safetensors"]
    assert s1.perplexity == s2.perplexity


@pytest.mark.parametrize("act_bits", [None, 8])
def test_eval_streams_float_checkpoints(fp32_dir, act_bits):
    """``tritonq eval`` on safetensors floats streams block by block and gives the whole model's perplexity."""
    from tritonq.engine.api import evaluate, load_evaluation_model
    from tritonq.engine.data import evaluation_windows, load_corpus, tokenize
    from tritonq.engine.evaluation.perplexity import perplexity
    from tritonq.engine.model_io import load_tokenizer

    streamed = evaluate(str(fp32_dir), "pydoc", max_windows=2, seqlen=64, device="cpu", progress=False,
                        act_bits=act_bits)
    text = load_corpus("pydoc", split="test")
    windows = evaluation_windows(tokenize(load_tokenizer(str(fp32_dir)), text.text), 64, 2, text.source)
    whole = load_evaluation_model(str(fp32_dir), torch.device("cpu"), torch.float32, act_bits=act_bits)
    assert streamed.perplexity == perplexity(whole, windows, torch.device("cpu"), progress=False).perplexity


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "opt"])
def test_every_family_streams_like_it_loads_whole(tmp_path, family):
    """Each architecture family's skeleton streams (rotary buffers rebuilt, OPT's learned positions and
    prefix-less names) to the same bytes and perplexity as the model loaded whole."""
    from test_pipeline import make_family_model

    src = make_family_model(tmp_path / family, family)
    memory, s_mem = _run(src, tmp_path / "memory", stream=False)
    streamed, s_str = _run(src, tmp_path / "streamed", stream=True)
    assert _digests(memory) == _digests(streamed)
    assert s_mem.perplexity == s_str.perplexity
