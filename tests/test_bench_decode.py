"""``tritonq bench decode --random-llama / --config``: the random-weight model is built from a config (nothing
downloaded); its packed side is RTN 4-bit g64 in ``QuantLinear`` on the CPU int4 op and its float side the
same RTN weights fake-quantized, so both compute one function (checked to bf16 precision). Speed is not
asserted here (no timed unit tests); the bench's fields and its memory accounting are."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from tritonq.bench.decode import memory_bandwidth, random_llama, random_llama_config, weight_bytes
from tritonq.engine.runtime.qlinear import QuantLinear, use_cpu_int4
from tritonq.errors import TritonqError

SMALL = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, vocab_size=300)


def test_default_random_llama_has_the_issue_shapes():
    config = random_llama_config(layers=3)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (2048, 5632, 3)


def test_random_llama_sides_compute_the_same_function():
    config = random_llama_config(layers=2, **SMALL)
    packed = random_llama(config, "packed", torch.float32, seed=1)
    dense = random_llama(config, "float", torch.float32, seed=1)
    assert use_cpu_int4(packed) == {}
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.uses_cpu_int4 and m.group_size == 64 for m in layers)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = packed(input_ids=ids).logits, dense(input_ids=ids).logits
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 2e-2, rel  # bf16 scales and activations in the op, not a different model
    wb_packed, wb_float = weight_bytes(packed), weight_bytes(dense)
    n_weights = sum(m.in_features * m.out_features for m in layers)
    assert wb_float["quantized_linears"] == 4 * n_weights
    assert wb_packed["quantized_linears"] == n_weights // 2 + n_weights // 64 * 2 * 2  # codes + bf16 s, zf
    embed = 300 * 128 * 4
    assert wb_float["read_per_token"] == wb_float["total"] - embed  # untied: the table is not read per token


def test_bandwidth_is_measured():
    bw = memory_bandwidth(mib=16, repeats=2)
    assert bw["copy_gb_per_s"] > 0 and bw["copy_gb_per_s_max"] >= bw["copy_gb_per_s"]


def _args(**kw) -> argparse.Namespace:
    base = dict(model=None, random_llama=False, config=None, layers=1, runs=2, prompt_tokens=5, max_new_tokens=3,
                json=True, device="cpu", dtype="auto")
    return argparse.Namespace(**{**base, **kw})


def test_bench_decode_on_a_config_file(tmp_path, capsys, monkeypatch):
    """A relative --config, as the README writes it: each side runs in another folder (issue 20, item 11)."""
    from tritonq.bench.decode import main

    cfg = random_llama_config(layers=1, **SMALL)
    cfg.save_pretrained(tmp_path / "models" / "llama")
    monkeypatch.chdir(tmp_path)
    assert main(_args(config="models/llama/config.json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"]["kind"] == "random" and result["runs"] == 2
    assert result["source"]["config"] == str(tmp_path / "models" / "llama" / "config.json")
    for side in ("packed", "float"):
        s = result[side]
        assert s["prompt_tokens"] == 5 and s["new_tokens"] == 3
        for stage in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert 0 < s[stage]["min"] <= s[stage]["median"] <= s[stage]["max"]
        assert s["rss_bytes"] > 0 and s["weight_bytes"]["total"] > s["weight_bytes"]["quantized_linears"] > 0
        assert s["decode_bound_tokens_per_s"] == pytest.approx(
            result["bandwidth"]["copy_gb_per_s"] * 1e9 / s["weight_bytes"]["read_per_token"])
    assert result["quantized_linear_memory_ratio"] == pytest.approx(4 / (0.5 + 4 / 64))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({}, "either a packed checkpoint"), ({"random_llama": True, "model": "x"}, "not both"),
     ({"random_llama": True, "layers": 0}, "--layers"), ({"random_llama": True, "runs": 0}, "--runs"),
     ({"model": "/nonexistent"}, "not a packed checkpoint"), ({"config": "/nonexistent.json"}, "does not exist")],
)
def test_bad_arguments_are_clear_errors(kw, message):
    from tritonq.bench.decode import main

    with pytest.raises(TritonqError, match=message):
        main(_args(**kw))


def test_bench_matmul_cpu_int4_rows_check_the_op_against_float64(capsys):
    """``tritonq bench matmul --cpu-int4`` on small shapes: every row's op output matched the float64 product
    with the layer's dequantized weights (bf16 activations and scales: within 2^-6 of the output's scale), and
    the JSON carries both sides' timings with their spread. Speed itself is not asserted."""
    from tritonq.bench.matmul import cpu_int4_bench

    rc = cpu_int4_bench(True, shapes=((256, 128), (384, 144)), ms=(1, 3), runs=2, budget_s=0.001)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["mode"] == "cpu-int4" and out["all_match"]
    assert [(r["K"], r["N"], r["M"]) for r in out["rows"]] == [(256, 128, 1), (256, 128, 3), (384, 144, 1),
                                                               (384, 144, 3)]
    for r in out["rows"]:
        assert 0 < r["rel_err"] <= 2.0**-6  # nonzero: bf16 really is in the path, the check is not vacuous
        assert r["int4_us_min"] <= r["int4_us"] <= r["int4_us_max"]
        assert r["fp32_us_min"] <= r["fp32_us"] <= r["fp32_us_max"]
        assert r["speedup"] == pytest.approx(r["fp32_us"] / r["int4_us"])


def test_bench_matmul_cpu_int4_refuses_plot():
    from tritonq.bench.matmul import main

    with pytest.raises(TritonqError, match="--cpu-int4"):
        main(argparse.Namespace(json=True, plot="x.png", cpu_int4=True, runs=1))


# ---------------------------------------------------------------------------------------------------
# the llama.cpp side (issue 23, item 1): the same RTN g32 weights as a Q4_1 GGUF


def _tiny_checkpoint(layers: int = 2, seed: int = 1):
    from tritonq.bench.decode_llama_cpp import RandomLlamaCheckpoint
    from tritonq.engine.grid import GridSpec

    config = random_llama_config(layers=layers, **SMALL)
    return config, RandomLlamaCheckpoint(config, GridSpec(bits=4, group_size=32, sym=False), torch.float32, seed)


def test_gguf_holds_the_compressed_tensors_weights_within_the_fp16_rounding_of_m(tmp_path):
    """One checkpoint feeds both writers; the packed side's own RTN weights (``random_llama``, same seed) equal
    the compressed-tensors records bit for bit, and the Q4_1 GGUF dequantizes to them within half an fp16 ulp
    of each block's ``m = -s z`` (not exactly: Q4_1 stores ``m`` in fp16)."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tritonq.bench.decode_llama_cpp import check_gguf_weights
    from tritonq.engine.formats.gguf import GGUF_FILE, GgufFormat, rope_row_order
    from tritonq.engine.formats.registry import get_format, read_packed

    config, ckpt = _tiny_checkpoint()
    get_format("compressed-tensors").write(ckpt, tmp_path / "ct")
    (tmp_path / "gguf").mkdir()
    GgufFormat().write(ckpt, tmp_path / "gguf", float_type="f32")
    ct = {name: q for name, _, q in read_packed(tmp_path / "ct")}
    dense = random_llama(config, "float", torch.float32, seed=1, group_size=32)
    tensors = {t.name: t for t in GGUFReader(str(tmp_path / "gguf" / GGUF_FILE)).tensors}
    assert len(ct) == 14
    worst = 0.0
    for name, q in ct.items():
        want = q.dequantize()
        assert torch.equal(want, dense.get_submodule(name).weight.data), name  # what the packed side packs
        layer, leaf = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf]
        t = tensors[f"blk.{layer}.{gname}.weight"]
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).double()
        if leaf in ("q_proj", "k_proj"):  # the GGUF holds llama.cpp's rotary row order
            heads = config.num_attention_heads if leaf == "q_proj" else config.num_key_value_heads
            got = got[torch.argsort(rope_row_order(got.shape[0], heads))]
        m = (q.scale.double() * q.zero.double()).repeat_interleave(32, dim=1)
        diff = (got - want.double()).abs()
        assert float((diff - (m * 2.0**-11 + 2.0**-23 * (want.double().abs() + m))).max()) <= 0, name
        worst = max(worst, float(diff.max()))
    assert worst > 0  # m really is rounded: the check can tell exact from close
    check = check_gguf_weights(tmp_path / "gguf" / GGUF_FILE, ckpt)
    assert check["within_m_rounding"] + check["exact"] == 14 and check["float_exact"] == 7
    assert 0 < check["worst_ratio_to_bound"] <= 1


def test_gguf_check_refuses_other_weights(tmp_path):
    pytest.importorskip("gguf")
    from tritonq.bench.decode_llama_cpp import check_gguf_weights
    from tritonq.engine.formats.gguf import GGUF_FILE, GgufFormat

    _, ckpt = _tiny_checkpoint(seed=1)
    _, other = _tiny_checkpoint(seed=2)
    GgufFormat().write(other, tmp_path, float_type="f32")
    with pytest.raises(TritonqError, match="GGUF"):
        check_gguf_weights(tmp_path / GGUF_FILE, ckpt)


def test_llama_cpp_computes_the_packed_sides_function(tmp_path):
    """llama.cpp on the GGUF against the fake-quantized float model on the same ids: the logits agree to
    llama.cpp's own rounding (8-bit activation blocks for its Q4_1 dot products), so rotary order, norms and
    heads are laid out as HF computes them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tritonq.bench.decode_llama_cpp import run_llama_cpp_side, write_random_gguf

    config = random_llama_config(layers=2, **SMALL)
    written = write_random_gguf(config, {"group_size": 32, "seed": 1}, "float32", str(tmp_path), check=False)
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = llama_cpp.Llama(written["path"], n_ctx=16, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    got = torch.from_numpy(llm.scores[: len(ids)].copy()).double()
    dense = random_llama(config, "float", torch.float32, seed=1, group_size=32)
    with torch.no_grad():
        want = dense(input_ids=torch.tensor([ids])).logits[0].double()
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < 3e-2, rel
    # the bench's greedy tokens: each is the float model's best next token, up to llama.cpp's rounding
    tokens = run_llama_cpp_side(written["path"], ids, new_tokens=6, runs=1, threads=1)["tokens"]
    with torch.no_grad():
        logits = dense(input_ids=torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].double()
    best = logits.max(dim=1).values
    chosen = logits.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
    assert float((best - chosen).max()) <= 0.1 * float((best - logits.mean(dim=1)).min()), (best - chosen)


def test_bench_decode_llama_cpp_side(tmp_path, capsys, monkeypatch):
    pytest.importorskip("llama_cpp")
    from tritonq.bench.decode import main

    config = random_llama_config(layers=1, **SMALL)
    config.save_pretrained(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(_args(config="config.json", sides="packed,llama.cpp")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sides"] == ["packed", "llama.cpp"] and "float" not in result and "decode_speedup" not in result
    assert result["source"]["group_size"] == 32
    ours, theirs = result["packed"], result["llama.cpp"]
    assert theirs["threads"] == ours["threads"] and theirs["prompt_tokens"] == 5 and theirs["new_tokens"] == 3
    for stage in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert 0 < theirs[stage]["min"] <= theirs[stage]["median"] <= theirs[stage]["max"]
    wb = theirs["weight_bytes"]
    q_rows, kv_rows = 4 * config.head_dim, 2 * config.head_dim
    n_weights = 128 * (2 * q_rows + 2 * kv_rows) + 3 * 128 * 384  # q, o; k, v; gate, up, down
    assert wb["quantized_linears"] == n_weights // 32 * 20  # Q4_1: 20 bytes per 32 weights
    assert ours["weight_bytes"]["quantized_linears"] == wb["quantized_linears"]  # codes + bf16 s, zf: as many
    assert wb["total"] - wb["read_per_token"] == 300 * 128 * 2  # the F16 input embedding table
    assert theirs["decode_bound_tokens_per_s"] == pytest.approx(
        result["bandwidth"]["copy_gb_per_s"] * 1e9 / wb["read_per_token"])
    assert ours["weight_bytes"]["read_per_token"] > 0 and theirs["rss_bytes"] > 0
    v = result["vs_llama_cpp"]
    assert v["decode_speedup"] == pytest.approx(ours["decode_tokens_per_s"]["median"]
                                                / theirs["decode_tokens_per_s"]["median"])
    assert 0 <= v["identical_prefix_tokens"] <= v["matching_greedy_tokens"] <= 3
    check = theirs["gguf"]["weights_check"]
    assert check["exact"] + check["within_m_rounding"] == 7 and check["float_exact"] == 5  # 2 norms a layer, 3 more


def test_llama_cpp_side_without_llama_cpp_is_one_clear_error(monkeypatch):
    import sys

    from tritonq.bench.decode import main

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(TritonqError, match="pip install llama-cpp-python"):
        main(_args(random_llama=True, sides="packed,llama.cpp"))


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"sides": "float"}, "packed included"), ({"sides": "packed,gpu"}, "packed, float, llama.cpp"),
     ({"sides": "packed,packed"}, "distinct"), ({"sides": "packed,llama.cpp", "group_size": 64}, "--group-size 32")],
)
def test_bad_sides_are_clear_errors(kw, message):
    from tritonq.bench.decode import main

    with pytest.raises(TritonqError, match=message):
        main(_args(random_llama=True, **kw))


def test_llama_cpp_side_needs_the_random_llama(tmp_path):
    """A packed checkpoint has no GGUF of its own here: refused before any side is built."""
    from tritonq.bench.decode import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {}}))
    with pytest.raises(TritonqError, match="--random-llama or --config"):
        main(_args(model=str(tmp_path), sides="packed,llama.cpp"))


def test_cli_passes_sides_and_group_size():
    from tritonq.cli import build_parser

    args = build_parser().parse_args(["bench", "decode", "--random-llama", "--sides", "packed,llama.cpp",
                                      "--group-size", "32"])
    assert (args.sides, args.group_size) == ("packed,llama.cpp", 32)
    default = build_parser().parse_args(["bench", "decode", "--random-llama"])
    assert (default.sides, default.group_size) == ("packed,float", None)
