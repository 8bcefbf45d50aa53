"""``--quantize-head`` (engine/formats/head.py): the lm_head and embedding table as integer tables, written to
compressed-tensors and GGUF, loaded back by ``load_packed_model``, refused where a format cannot hold them.

Oracles: the rounding is checked against the grid's own promise (every weight within half a step of its code,
the int8 scale ``2 max|w| / 255`` per row) rather than against the same code; the loaded model is compared with
a float model built from the float source and the checkpoint's dequantized tables (fp32 references: 1e-5; the
bf16 CPU ops: a bf16 tolerance); GGUF blocks are dequantized by the gguf package's own reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_tokenizer
from tritonq.engine import model_free
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.formats.head import INT8_ROWS, RECORD_KEY, round_table
from tritonq.engine.formats.registry import read_packed
from tritonq.engine.runtime.qlinear import Int8Embedding, Int8Linear, QuantLinear
from tritonq.engine.runtime.serve import load_packed_model
from tritonq.errors import TritonqError
from tritonq.kernels.int8_weight import int8_weight_linear

VOCAB = 266  # a multiple of neither 16 nor 32: the odd shapes of a real vocabulary


def _save_model(path: Path, tied: bool, seed: int, tokenizer=None, vocab: int = VOCAB) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # rows of very different ranges, so a per-tensor scale would be caught
        model.get_input_embeddings().weight.mul_(torch.rand(vocab, 1) * 4 + 0.1)
        if not tied:
            model.get_output_embeddings().weight.mul_(torch.rand(vocab, 1) * 4 + 0.1)
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer()).save_pretrained(path)
    return path


def _quantize(model: Path, out: Path, fmt: str, head: str, monkeypatch=None, **kw) -> Path:
    opts = QuantizeOptions(output=str(out), model=str(model), method="rtn", bits=4, group_size=32, sym=False,
                           out_format=fmt, device="cpu", progress=False, quantize_head=head, **kw)
    if monkeypatch is not None:  # the pipeline path (RunCheckpoint) instead of the model-free one
        monkeypatch.setattr(model_free, "applies", lambda *a: None)
    quantize(opts)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def source(request, tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("head") / "src", request.param, seed=11 + request.param)


def _float_state(src: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    return {"lm_head": model.lm_head.weight.detach().clone(),
            "model.embed_tokens": model.model.embed_tokens.weight.detach().clone()}


def _fake_quantized_model(src: Path, packed: Path):
    """The float source with every table of the checkpoint (body, head, embedding) replaced by its dequantized
    record, untied: what the packed model must compute."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    for name, _, q in read_packed(packed):
        model.get_submodule(name).weight.data = q.dequantize()
    return model.eval()


# --- rounding ----------------------------------------------------------------------------------------


def test_int8_rows_round_within_half_a_step():
    w = torch.randn(300, 96) * (torch.rand(300, 1) * 5 + 0.01)
    q = round_table("t", w, INT8_ROWS)
    scale = q.scale[:, 0]
    want = (w.abs().amax(1) * 2 / 255)
    torch.testing.assert_close(scale, want, rtol=1e-3, atol=0)  # fp16-rounded, per row
    assert bool((q.zero == 128).all())
    err = (q.dequantize() - w).abs()
    # half a step, except where the largest positive weight is clamped to code 255 (= 127 steps)
    bound = torch.maximum(scale / 2, w.abs().amax(1) - 127 * scale)[:, None]
    assert err.le(bound * (1 + 1e-6) + 1e-7).all()
    assert err.amax(1).ge(scale / 8).all()  # rounded, not stored exactly


# --- compressed-tensors ------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_compressed_tensors_round_trip(source, tmp_path, head):
    with pytest.warns(UserWarning, match="only tritonq loads this checkpoint"):
        out = _quantize(source, tmp_path / "ct", "compressed-tensors", head)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    qcfg = config["quantization_config"]
    targets = {t: g["weights"] for g in qcfg["config_groups"].values() for t in g["targets"]}
    assert targets["model.embed_tokens"]["num_bits"] == 8 and targets["model.embed_tokens"]["strategy"] == "channel"
    assert targets["lm_head"]["num_bits"] == (8 if head == "int8" else 4)
    assert targets["lm_head"]["strategy"] == ("channel" if head == "int8" else "group")
    assert "lm_head" not in qcfg["ignore"]
    record = json.loads((out / "quantization.json").read_text())[RECORD_KEY]
    assert record["mode"] == head and record["rounding"] == "rtn" and "transformers" in record["loaders"]
    assert record["tables"]["lm_head"]["bits"] == (8 if head == "int8" else 4)
    assert record["tied_in_source"] == bool(json.loads((source / "config.json").read_text())["tie_word_embeddings"])

    floats = _float_state(source)
    records = {name: (spec, q) for name, spec, q in read_packed(out)}
    for name in ("lm_head", "model.embed_tokens"):
        spec, q = records[name]
        w = floats[name]
        step = q.scale[:, q.g_idx.long()]
        assert (q.dequantize() - w).abs().le(step * 1.01).all(), name  # a step (half + the zero point's rounding)
    assert records["lm_head"][0].group_size == (-1 if head == "int8" else 32)

    ids = torch.randint(0, VOCAB, (2, 9))
    want = _fake_quantized_model(source, out)(ids).logits
    exact, _ = load_packed_model(out, device="cpu", dtype="float32", cpu_int4=False)
    assert isinstance(exact.model.embed_tokens, Int8Embedding)
    assert isinstance(exact.lm_head, Int8Linear if head == "int8" else QuantLinear)
    got = exact(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fast, _ = load_packed_model(out, device="cpu", dtype="float32")  # the bf16 CPU ops
    scale = want.abs().max()
    assert (fast(ids).logits - want).abs().max() < 2e-2 * scale


def test_int8_head_shares_the_embedding_table_in_memory(tmp_path):
    src = _save_model(tmp_path / "src", tied=True, seed=5)
    out = _quantize(src, tmp_path / "ct", "compressed-tensors", "int8")
    model, _ = load_packed_model(out, device="cpu", dtype="float32")
    assert model.model.embed_tokens.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    assert model.lm_head.kernel == "cpu_bf16"


def test_pipeline_path_writes_the_same_tables(tmp_path, monkeypatch):
    """RunCheckpoint (calibrated pipeline) and the model-free shards path round the head identically."""
    src = _save_model(tmp_path / "src", tied=True, seed=6)
    a = {n: q for n, _, q in read_packed(_quantize(src, tmp_path / "a", "compressed-tensors", "int4"))}
    b = {n: q for n, _, q in read_packed(_quantize(src, tmp_path / "b", "compressed-tensors", "int4", monkeypatch))}
    for name in ("lm_head", "model.embed_tokens"):
        assert torch.equal(a[name].codes, b[name].codes) and torch.equal(a[name].scale, b[name].scale)


def test_none_leaves_the_output_unchanged(tmp_path):
    src = _save_model(tmp_path / "src", tied=True, seed=7)
    out = _quantize(src, tmp_path / "ct", "compressed-tensors", "none")
    config = json.loads((out / "config.json").read_text())
    assert config.get("tie_word_embeddings", True) is True
    assert "lm_head" in config["quantization_config"]["ignore"]
    assert RECORD_KEY not in json.loads((out / "quantization.json").read_text())
    assert {n for n, _, _ in read_packed(out)}.isdisjoint({"lm_head", "model.embed_tokens"})


# --- GGUF ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["int8", "int4"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_types_and_blocks(tmp_path, head, tied):
    gguf = pytest.importorskip("gguf")
    from test_gguf import bpe_tokenizer
    from tritonq.engine.formats.gguf import GGUF_FILE

    src = _save_model(tmp_path / "src", tied, seed=21, tokenizer=bpe_tokenizer())
    out = _quantize(src, tmp_path / "gguf", "gguf", head)
    ct = _quantize(src, tmp_path / "ct", "compressed-tensors", head)
    tables = {n: q.dequantize() for n, _, q in read_packed(ct)}
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / GGUF_FILE)).tensors}
    q = gguf.GGMLQuantizationType
    assert tensors["token_embd.weight"].tensor_type == q.Q8_0
    assert tensors["output.weight"].tensor_type == (q.Q8_0 if head == "int8" else q.Q4_1)
    for gname, name in (("token_embd.weight", "model.embed_tokens"), ("output.weight", "lm_head")):
        t = tensors[gname]
        got = torch.from_numpy(np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).copy())
        want = tables[name]
        if t.tensor_type == q.Q8_0:  # the per-row int8 table exactly (d = the row's scale, repeated per block)
            assert torch.equal(got.reshape(want.shape), want)
        else:  # Q4_1 stores m = -s z in fp16
            torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=float(want.abs().max()) * 2e-3)
    record = json.loads((out / "quantization.json").read_text())[RECORD_KEY]
    assert record["mode"] == head


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fake", "gptq_v2", "awq"])
def test_formats_that_cannot_hold_the_head_refuse(tmp_path, fmt):
    src = _save_model(tmp_path / "src", tied=True, seed=8)
    with pytest.raises(TritonqError, match=f"--format {fmt} cannot hold a quantized lm_head"):
        _quantize(src, tmp_path / "out", fmt, "int8")
    assert not (tmp_path / "out").exists()


def test_bad_mode_and_eval_data_refuse(tmp_path):
    src = _save_model(tmp_path / "src", tied=True, seed=9)
    with pytest.raises(TritonqError, match="unknown --quantize-head 'int2'"):
        _quantize(src, tmp_path / "out", "compressed-tensors", "int2")
    data = tmp_path / "eval.txt"
    data.write_text("hello world " * 200)
    with pytest.raises(TritonqError, match="--eval-data scores the model in memory"):
        _quantize(src, tmp_path / "out", "compressed-tensors", "int8", eval_data=str(data))


def test_activation_quantization_refuses(tmp_path):
    src = _save_model(tmp_path / "src", tied=True, seed=10)
    with pytest.raises(TritonqError, match="--quantize-head int8 is for weight-only runs"):
        _quantize(src, tmp_path / "out", "compressed-tensors", "int8", act_bits=8)


def test_cli_flag(tmp_path):
    from tritonq.cli import main

    src = _save_model(tmp_path / "src", tied=False, seed=12)
    rc = main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--format",
               "compressed-tensors", "--quantize-head", "int4", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "o" / "quantization.json").read_text())[RECORD_KEY]["mode"] == "int4"


# --- runtime pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 64, 259), (5, 96, 1000), (3, 2, 48, 17)])
def test_int8_weight_linear_against_dense(shape):
    *lead, k, n = shape
    x = torch.randn(*lead, k)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) + 0.01
    bias = torch.randn(n)
    dense = torch.nn.functional.linear(x.double(), wq.double() * scale.double()[:, None], bias.double())
    ref = int8_weight_linear(x, wq, scale, bias)  # the reference by default
    assert ref.shape == (*lead, n) and ref.dtype == x.dtype
    torch.testing.assert_close(ref.double(), dense, rtol=1e-5, atol=1e-6 * float(dense.abs().max()))  # fp32 sums
    fast = int8_weight_linear(x, wq, scale, bias, kernel="cpu_bf16")
    assert (fast.double() - dense).abs().max() < 1e-2 * dense.abs().max()


def test_int8_weight_linear_refuses_bad_arguments():
    x, wq = torch.randn(2, 8), torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(TritonqError, match="scale must be"):
        int8_weight_linear(x, wq, torch.ones(3))
    with pytest.raises(TritonqError, match="weight must be int8"):
        int8_weight_linear(x, wq.float(), torch.ones(4))
    with pytest.raises(TritonqError, match="unknown kernel"):
        int8_weight_linear(x, wq, torch.ones(4), kernel="gpu")
    with pytest.raises(TritonqError, match="needs in_features % 16 == 0"):  # the op would crash the process
        int8_weight_linear(x, wq, torch.ones(4), kernel="cpu_bf16")


def test_int8_embedding_dequantizes_the_gathered_rows():
    from tritonq.engine.formats.records import PackedInt8Linear

    wq = torch.randint(-128, 128, (50, 16), dtype=torch.int8)
    scale = torch.rand(50) + 0.1
    emb = Int8Embedding(PackedInt8Linear(wq, scale, 16, 50), torch.float32)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    torch.testing.assert_close(emb(ids), (wq.float() * scale[:, None])[ids])


def test_dequantized_copy_is_float_with_the_same_logits(tmp_path):
    """``bench decode``'s float baseline of a quantized-head checkpoint: plain float modules, the same model."""
    from tritonq.engine.runtime.serve import dequantized_copy

    src = _save_model(tmp_path / "src", tied=False, seed=13)
    out = _quantize(src, tmp_path / "ct", "compressed-tensors", "int8")
    packed, _ = load_packed_model(out, device="cpu", dtype="float32", cpu_int4=False)
    dense = dequantized_copy(packed)
    assert type(dense.lm_head) is torch.nn.Linear and type(dense.model.embed_tokens) is torch.nn.Embedding
    ids = torch.randint(0, VOCAB, (1, 7))
    torch.testing.assert_close(dense(ids).logits, packed(ids).logits, rtol=1e-4, atol=1e-4)


def test_bench_weight_bytes_counts_the_int8_tables(tmp_path):
    """``bench decode``'s byte count: the embedding table is not read per token when the head reads its own copy
    (tritonq's CPU ops repack the head: int8 into its row layout, int4 too); a shared table would be."""
    from tritonq.bench.decode import weight_bytes

    src = _save_model(tmp_path / "src", tied=True, seed=14, vocab=272)  # 272 = 17 x 16: the int4 CPU op takes it
    for head, shared in (("int8", False), ("int4", False)):
        model, _ = load_packed_model(_quantize(src, tmp_path / head, "compressed-tensors", head), device="cpu",
                                     dtype="float32")
        assert isinstance(model.lm_head, Int8Linear) or model.lm_head.uses_cpu_int4
        sizes = weight_bytes(model)
        table = 272 * 64 + 272 * 4  # int8 codes + fp32 scales
        assert sizes["read_per_token"] == sizes["total"] - (0 if shared else table), head


def test_an_embedding_stored_on_another_grid_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    from tritonq.engine.formats.records import DenseLinear
    from tritonq.engine.runtime.qlinear import swap_embeddings

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=40))
    layers = {"model.embed_tokens": DenseLinear(torch.randn(40, 32), 32, 40)}
    with pytest.raises(TritonqError, match="tritonq loads it only as int8 symmetric per row"):
        swap_embeddings(model, layers, torch.float32)
