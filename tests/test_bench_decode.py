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
