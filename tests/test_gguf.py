"""GGUF export (engine/formats/gguf.py, gguf_vocab.py): read back with gguf's own GGUFReader, dequantized in numpy.

The oracle for the blocks is an independent numpy transcription of ggml's Q4_0 / Q4_1 layout (and gguf's
``quants.dequantize`` where present); the oracle for the rotary row order is the per-row formula of
``convert_hf_to_gguf``'s permute, written out with loops. A tiny random Llama is built from a config with a
byte-level BPE tokenizer that has real merges. When llama-cpp-python is importable, llama.cpp itself loads
the file: its tokenizer must agree with the HF tokenizer and its logits with the fake-quantized HF model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHAT_TEMPLATE, _bytes_to_unicode, make_fake_dir
from tritonq.cli import main
from tritonq.engine.formats import gguf as gguf_writer
from tritonq.engine.formats import gguf_vocab as gguf_export
from tritonq.engine.formats.checkpoint import read_source, source_layers
from tritonq.engine.formats.gguf import GGUF_FILE, save_float_gguf
from tritonq.engine.formats.registry import save_packed
from tritonq.errors import TritonqError

gguf = pytest.importorskip("gguf")

VOCAB = 266  # 256 bytes + 4 merges + 3 specials = 263 ids; rows 263..265 are padding ("[PAD263]")
SPECIALS = {"<s>": 260, "</s>": 261, "<pad>": 262}
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2")]
TEXT = "Hello the world, the 12 cats' 123 meows!\n\n  Then they left.  "


def bpe_tokenizer(pre: str = "gpt-2"):
    """Byte-level BPE with 4 merges and 3 special tokens, pre-tokenized as llama.cpp's ``pre`` expects."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab.update(SPECIALS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre == "llama-bpe":
        split = pre_tokenizers.Split(Regex(gguf_export.LLAMA3_SPLIT), behavior="isolated", invert=False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                      use_regex=False)])
    else:
        raise ValueError(pre)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def fake_dir(path: Path, pre: str = "gpt-2", **kw) -> Path:
    overrides = {"vocab_size": VOCAB, "bos_token_id": 260, "eos_token_id": 261, "pad_token_id": 262,
                 **kw.pop("config_overrides", {})}
    make_fake_dir(path, config_overrides=overrides, **kw)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (path / f).unlink(missing_ok=True)
    bpe_tokenizer(pre).save_pretrained(path)
    return path


def field(reader, key):
    return reader.fields[key].contents()


# --- oracles --------------------------------------------------------------------------------------


def dequant_q4(raw: np.ndarray, sym: bool, n: int, k: int) -> np.ndarray:
    """ggml Q4_0 / Q4_1 blocks (uint8 [N, K/32*B]) to float32 [N, K], one block at a time."""
    per = 18 if sym else 20
    raw = raw.reshape(n, k // 32, per)
    out = np.empty((n, k), dtype=np.float32)
    for r in range(n):
        for b in range(k // 32):
            blk = raw[r, b]
            d = np.float32(blk[0:2].view(np.float16)[0])
            m = np.float32(0) if sym else np.float32(blk[2:4].view(np.float16)[0])
            qs = blk[per - 16:]
            for j in range(16):
                lo, hi = int(qs[j] & 0x0F), int(qs[j] >> 4)
                if sym:
                    out[r, 32 * b + j], out[r, 32 * b + j + 16] = d * np.float32(lo - 8), d * np.float32(hi - 8)
                else:
                    out[r, 32 * b + j], out[r, 32 * b + j + 16] = d * lo + m, d * hi + m
    return out


def rope_permuted(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's q/k permute, row by row: new row h*d + 2i + j is old row h*d + j*d/2 + i."""
    d = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def tritonq_weights(src: Path) -> dict[str, torch.Tensor]:
    """tritonq's own dequantization of every quantized linear (the fp32 grid points)."""
    _, spec, meta = read_source(src)
    return {name: q.dequantize() for name, q in source_layers(src, spec, meta["layers"])}


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    _, _, i, a, b = hf.split(".")
    return f"blk.{i}.{GGUF_NAMES[a + '.' + b]}.weight"


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [False, True])
def test_blocks_dequantize_to_tritonq_weights(tmp_path, sym):
    src = fake_dir(tmp_path / "src", sym=sym, seed=3)
    out = save_packed(src, tmp_path / "out", "gguf")
    reader = gguf.GGUFReader(str(out / GGUF_FILE))
    tensors = {t.name: t for t in reader.tensors}
    want_type = gguf.GGMLQuantizationType.Q4_0 if sym else gguf.GGMLQuantizationType.Q4_1
    config = json.loads((src / "config.json").read_text())
    ref = tritonq_weights(src)
    assert len(ref) == 14
    for name, w in ref.items():
        t = tensors[gguf_name(name)]
        n, k = w.shape
        assert t.tensor_type == want_type, name
        assert [int(x) for x in t.shape] == [k, n]  # ggml order: ne0 = row length
        got = dequant_q4(np.asarray(t.data), sym, n, k)
        if hasattr(gguf, "quants"):  # the package's own reader agrees with the transcription
            np.testing.assert_array_equal(gguf.quants.dequantize(np.asarray(t.data), want_type), got)
        if name.endswith("q_proj"):
            w = rope_permuted(w, config["num_attention_heads"])
        elif name.endswith("k_proj"):
            w = rope_permuted(w, config["num_key_value_heads"])
        w = w.numpy()
        if sym:  # Q4_0: d = scale exactly and (q - 8) * d is exact in fp32
            np.testing.assert_array_equal(got, w, err_msg=name)
        else:  # Q4_1: m = -scale * zero rounded to fp16 moves a block by at most half an fp16 ulp of |m|
            _, spec, _ = read_source(src)
            q = next(q for nm, q in source_layers(src, spec, [name]))
            m = (q.scale * q.zero).double()
            if name.endswith(("q_proj", "k_proj")):
                m = rope_permuted(m, config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
            bound = (m * 2.0**-11).repeat_interleave(32, dim=1).numpy() + 4e-7 * np.abs(w) + 1e-30
            err = np.abs(got.astype(np.float64) - w)
            assert (err <= bound).all(), (name, float((err / bound).max()))


def test_rows_are_permuted_for_rotary_only_in_q_and_k(tmp_path):
    src = fake_dir(tmp_path / "src", seed=5)
    out = save_packed(src, tmp_path / "out", "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / GGUF_FILE)).tensors}
    ref = tritonq_weights(src)
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                 "model.layers.1.self_attn.v_proj"):
        w = ref[name]
        got = torch.from_numpy(dequant_q4(np.asarray(tensors[gguf_name(name)].data), False, *w.shape))
        unpermuted_close = torch.allclose(got, w, atol=1e-3)
        assert unpermuted_close == name.endswith("v_proj"), name  # q and k are not in HF order, v is


def test_metadata_vocabulary_and_float_tensors(tmp_path):
    src = fake_dir(tmp_path / "src", seed=1)
    out = save_packed(src, tmp_path / "out", "gguf")
    assert sorted(p.name for p in out.iterdir()) == [GGUF_FILE, "quantization.json"]  # the record, for report
    assert json.loads((out / "quantization.json").read_text())["format"] == "gguf"
    r = gguf.GGUFReader(str(out / GGUF_FILE))
    config = json.loads((src / "config.json").read_text())
    expect = {
        "general.architecture": "llama", "general.type": "model", "general.file_type": 3,
        "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.vocab_size": VOCAB, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 260,
        "tokenizer.ggml.eos_token_id": 261, "tokenizer.ggml.padding_token_id": 262,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE, "tritonq.bits": 4,
        "tritonq.group_size": 32, "tritonq.sym": False,
    }
    for key, value in expect.items():
        assert field(r, key) == value, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(config.get("rope_theta") or
                                                            config["rope_parameters"]["rope_theta"])
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tok = bpe_tokenizer()
    tokens = field(r, "tokenizer.ggml.tokens")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert tokens[:263] == [by_id[i] for i in range(263)]
    assert tokens[263:] == ["[PAD263]", "[PAD264]", "[PAD265]"]
    types = field(r, "tokenizer.ggml.token_type")
    tt = gguf.TokenType
    assert types[:260] == [tt.NORMAL] * 260 and types[260:263] == [tt.CONTROL] * 3
    assert types[263:] == [tt.UNUSED] * 3
    assert field(r, "tokenizer.ggml.merges") == [f"{a} {b}" for a, b in MERGES]
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 2 * 9  # token_embd, output_norm, output; 7 linears + 2 norms per block
    ft = gguf.GGMLQuantizationType
    from safetensors.torch import load_file

    hf = load_file(str(src / "model.safetensors"))
    for gname, key, qtype in [("token_embd.weight", "model.embed_tokens.weight", ft.F16),
                              ("output.weight", "lm_head.weight", ft.F16),
                              ("output_norm.weight", "model.norm.weight", ft.F32),
                              ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight", ft.F32),
                              ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight", ft.F32)]:
        t = tensors[gname]
        assert t.tensor_type == qtype, gname
        want = hf[key].to(torch.float16 if qtype == ft.F16 else torch.float32).numpy()
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want, err_msg=gname)


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    src = fake_dir(tmp_path / "src", config_overrides={"tie_word_embeddings": True})
    out = save_packed(src, tmp_path / "out", "gguf")
    names = {t.name for t in gguf.GGUFReader(str(out / GGUF_FILE)).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


def test_float_export_keeps_the_weights(tmp_path):
    src = fake_dir(tmp_path / "src", seed=2)
    path = save_float_gguf(src, tmp_path / "f32.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    from safetensors.torch import load_file

    hf = load_file(str(src / "model.safetensors"))
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    got = np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(q.shape)
    np.testing.assert_array_equal(got, rope_permuted(q, 4).numpy())
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not list(tmp_path.glob(".f32.gguf.tmp-*"))


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_pre_tokenizer_names(pre):
    assert gguf_export.pre_tokenizer_name(json.loads(bpe_tokenizer(pre).backend_tokenizer.to_str())) == pre


ERRORS = {
    "bits": (dict(bits=3), "GGUF Q4_0/Q4_1 blocks hold 32 weights at 4 bits; this grid has 3 bits"),
    "group": (dict(group_size=64), "group size 64. Quantize with --bits 4 --group-size 32"),
    "act_order": (dict(act_order=True), "is not k // 32 (group act-order)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_before_any_output(tmp_path, case):
    kw, message = ERRORS[case]
    src = fake_dir(tmp_path / "src", **kw)
    with pytest.raises(TritonqError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        save_packed(src, tmp_path / "out", "gguf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_other_architectures_and_tokenizers_are_refused(tmp_path):
    src = fake_dir(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    for bad, message in [({"model_type": "qwen2"}, "supports the architectures llama; this model is 'qwen2'"),
                         ({"attention_bias": True}, "does not write Llama biases"),
                         ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'")]:
        with pytest.raises(TritonqError, match=message):
            gguf_export.check_gguf_model({**config, **bad})
    tj = json.loads(bpe_tokenizer().backend_tokenizer.to_str())
    with pytest.raises(TritonqError, match="does not know llama.cpp's name"):
        gguf_export.pre_tokenizer_name({**tj, "pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(TritonqError, match="byte fallback"):
        gguf_export.pre_tokenizer_name({**tj, "model": {**tj["model"], "byte_fallback": True}})
    with pytest.raises(TritonqError, match="dynamic"):
        gguf_export.check_gguf_grid(gguf_export.GridSpec(4, 32, False), "dynamic")
    (src / "tokenizer.json").write_text(json.dumps({**tj, "model": {**tj["model"], "merges": []}}))
    with pytest.raises(TritonqError, match="has no BPE merges"):
        save_packed(src, tmp_path / "out", "gguf")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_pack_and_quantize_preflight(tmp_path, capsys):
    src = fake_dir(tmp_path / "src")
    assert main(["pack", str(src), "--format", "gguf", "--output", str(tmp_path / "out")]) == 0
    assert "wrote gguf checkpoint" in capsys.readouterr().out and (tmp_path / "out" / GGUF_FILE).is_file()
    rc = main(["pack", str(src), "--format", "gguf", "--output", str(tmp_path / "out")])
    assert rc != 0 and "not empty" in capsys.readouterr().err
    # quantize refuses before calibration: a model directory whose grid cannot be GGUF
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "model"
    LlamaForCausalLM(gguf_export_config()).save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    rc = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "64", "--format", "gguf",
               "--device", "cpu", "--no-progress", "--calib", str(tmp_path / "missing.txt"),
               "--output", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert rc != 0 and "--group-size 32" in err and not (tmp_path / "q").exists()


def gguf_export_config():
    from helpers import tiny_config

    return tiny_config(vocab_size=VOCAB, bos_token_id=260, eos_token_id=261, pad_token_id=262)


def test_cli_quantize_writes_gguf(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(model_dir)
    bpe_tokenizer().save_pretrained(model_dir)
    rc = main(["quantize", "--model", str(model_dir), "--method", "rtn", "--group-size", "32", "--format", "gguf",
               "--device", "cpu", "--no-progress", "--output", str(tmp_path / "q")])
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [GGUF_FILE, "quantization.json"]
    r = gguf.GGUFReader(str(tmp_path / "q" / GGUF_FILE))
    assert field(r, "tritonq.method") == "rtn"
    assert {t.tensor_type for t in r.tensors if ".attn_q." in t.name} == {gguf.GGMLQuantizationType.Q4_1}


# --- llama.cpp itself (optional) ------------------------------------------------------------------


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe"])
def test_llama_cpp_tokenizes_like_hf(tmp_path, pre):
    llama_cpp = pytest.importorskip("llama_cpp")
    src = fake_dir(tmp_path / "src", pre=pre)
    out = save_packed(src, tmp_path / "out", "gguf")
    llm = llama_cpp.Llama(str(out / GGUF_FILE), vocab_only=True, verbose=False)
    hf = bpe_tokenizer(pre)
    for text in (TEXT, "the12 345 6789 x", "  \n\tthe the"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text), (pre, text)


def _llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


@pytest.mark.parametrize("sym", [False, True])
def test_llama_cpp_logits_match_the_fake_quantized_model(tmp_path, sym, monkeypatch):
    """llama.cpp's logits on the GGUF against transformers' on the same grid points (fp32, CPU).

    Tolerance: llama.cpp multiplies Q4 blocks with activations it rounds to 8-bit blocks (Q8_0 / Q8_1) and
    keeps the embedding and output in F16, so logits differ by about 2% of their spread (rms; measured
    1.7%) here; we require rms < 5% and max < 25% of the logits' standard deviation. Weights are drawn
    with std 0.1 so attention is not uniform: the same file written without the rotary row permutation
    is then off by about 60% rms and must be at least 10x worse (the check can fail).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import LlamaForCausalLM

    src = fake_dir(tmp_path / "src", sym=sym, seed=7, config_overrides={"initializer_range": 0.1})
    out = save_packed(src, tmp_path / "out", "gguf")
    ids = [260, *bpe_tokenizer().encode(TEXT)][:48]
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    got = _llama_cpp_logits(llama_cpp, out / GGUF_FILE, ids)
    spread = ref.std()
    rms = np.sqrt(((got - ref) ** 2).mean()) / spread
    assert rms < 0.05 and np.abs(got - ref).max() / spread < 0.25, rms
    monkeypatch.setattr(gguf_writer, "_row_order", lambda key, config: None)  # the writer's, not gguf_vocab's
    wrong = save_packed(src, tmp_path / "wrong", "gguf")
    rms_wrong = np.sqrt(((_llama_cpp_logits(llama_cpp, wrong / GGUF_FILE, ids) - ref) ** 2).mean()) / spread
    assert rms_wrong > 10 * rms, (rms, rms_wrong)
