"""The memory estimate (engine/memory.py): parts add up, scale with the calibration and the model, match a small
config computed by hand, the ``tritonq memory`` subcommand prints it from a config alone, and the README's table
is the generator's output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tritonq.cli import main
from tritonq.engine.memory import (
    INTERPRETER_BYTES,
    WRITER_BUFFER_BYTES,
    ModelShape,
    estimate_memory,
)
from tritonq.errors import TritonqError

from .helpers import tiny_config

LLAMA_8B = dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _tiny(**kw) -> dict:
    cfg = dict(model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=259, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def _est(config, method="gptq", **kw):
    args = dict(nsamples=128, seqlen=512, calib_batch=8, compute_dtype="float16", checkpoint_dtype="bfloat16",
                store="device", device_type="cuda")
    args.update(kw)
    return estimate_memory(config, method, **args)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "boa"])
@pytest.mark.parametrize("device_type,store", [("cuda", "device"), ("cuda", "cpu"), ("cpu", "device"),
                                               ("cpu", "disk")])
def test_parts_add_up(method, device_type, store):
    est = _est(LLAMA_8B, method, device_type=device_type, store=store,
               compute_dtype="float32" if device_type == "cpu" else "float16")
    assert est.peak_host == sum(est.host_parts.values()) > INTERPRETER_BYTES
    assert est.peak_device == sum(est.device_parts.values())
    assert (est.peak_device > 0) == (device_type == "cuda")
    assert est.phases[est.host_phase][0] == est.peak_host
    assert max(h for h, _ in est.phases.values()) == est.peak_host
    assert all(v > 0 for v in est.components.values())
    lines = est.describe().splitlines()
    assert 1 <= len(lines) <= 4 and "GiB" in lines[0]
    assert json.loads(json.dumps(est.to_json()))["peak_host_bytes"] == est.peak_host


def test_cache_scales_with_nsamples_and_seqlen():
    n = random.choice([16, 32, 64])
    base = _est(LLAMA_8B, nsamples=n)
    cache = base.device_parts["calibration cache"]
    assert _est(LLAMA_8B, nsamples=2 * n).device_parts["calibration cache"] == 2 * cache
    assert _est(LLAMA_8B, nsamples=n, seqlen=1024).device_parts["calibration cache"] == 2 * cache
    # the method state of GPTQ does not depend on the calibration size
    assert _est(LLAMA_8B, nsamples=2 * n).device_parts["method state"] == base.device_parts["method state"]


def test_scales_with_model_width():
    base = _est(LLAMA_8B, store="cpu")
    wide = _est({**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
                 "num_key_value_heads": 16}, store="cpu")
    # the cache is linear in the widths, the block's weights and GPTQ's K x K state quadratic
    assert wide.host_parts["calibration cache"] == 2 * base.host_parts["calibration cache"]
    assert wide.device_parts["block weights"] == pytest.approx(4 * base.device_parts["block weights"], rel=1e-3)
    assert wide.device_parts["method state"] == pytest.approx(4 * base.device_parts["method state"], rel=1e-3)


def test_offload_moves_the_cache_off_the_device():
    on_device, on_host = _est(LLAMA_8B), _est(LLAMA_8B, store="cpu")
    cache = on_device.device_parts["calibration cache"]
    assert on_device.peak_device - on_host.peak_device >= cache - on_host.device_parts.get("chunk staging", 0)
    assert on_host.host_parts["calibration cache"] == cache
    on_disk = _est(LLAMA_8B, store="disk")
    assert "calibration cache" not in on_disk.host_parts and "calibration cache" not in on_disk.device_parts


def test_small_config_by_hand():
    """GPTQ on a 2-layer 64/128 Llama (4 heads of 16, 2 KV heads), 4 x 16 tokens, chunks of 2, fp32 on the CPU."""
    est = estimate_memory(_tiny(), "gptq", nsamples=4, seqlen=16, calib_batch=2, compute_dtype="float32",
                          checkpoint_dtype="float32", store="device", device_type="cpu")
    params = 64 * 128 + 64 * 64 + 64 * 256 + 128 * 64 + 2 * 64  # q/k/v, o, gate/up, down, two norms
    assert ModelShape.from_config(_tiny()).block_params() == params
    tokens = 4 * 16
    cache_down = tokens * (64 + 64 + 128) * 4  # inputs, the attention's replay, down_proj's inputs
    solve_down = 4 * 128 * 128 * 4 + 64 * 128 * 4  # four K x K fp32 at the triangular solve, the rows in fp32
    block = next(v[0] for k, v in est.phases.items() if k.startswith("block stage"))
    assert "block stage down_proj" in est.phases
    assert block == INTERPRETER_BYTES + params * 4 + cache_down + solve_down
    write = INTERPRETER_BYTES + 259 * 64 * 4 + WRITER_BUFFER_BYTES  # the embedding is the largest tensor
    assert est.phases["the write"][0] == write
    assert est.peak_host == max(block, write, est.phases["capture"][0], est.phases["a block's load"][0])
    assert est.block_rise() == cache_down - tokens * 64 * 4 + solve_down


def test_rtn_has_no_cache_and_no_capture():
    est = _est(LLAMA_8B, "rtn")
    assert "capture" not in est.phases
    assert "calibration cache" not in est.components and "chunk intermediates" not in est.components
    assert "--offload" not in est.describe()


def test_methods_differ_where_their_code_does():
    gptq, boa, awq = (_est(LLAMA_8B, m, store="cpu") for m in ("gptq", "boa", "awq"))
    assert boa.peak_device >= gptq.peak_device  # GPTQ's solve plus BoA's query/key moments
    assert awq.device_parts["method state"] < gptq.device_parts["method state"]  # no K x K inverse


@pytest.mark.parametrize("bad,message", [(dict(store="ssd"), "activation store"),
                                         (dict(device_type="tpu"), "device"),
                                         (dict(compute_dtype="int8"), "dtype"),
                                         (dict(nsamples=0), "--nsamples")])
def test_bad_input(bad, message):
    with pytest.raises(TritonqError, match=message):
        _est(LLAMA_8B, **bad)


def test_config_without_sizes():
    with pytest.raises(TritonqError, match="hidden_size"):
        _est({"model_type": "llama"})


def test_whole_model_when_not_streamed():
    streamed = _est(LLAMA_8B, device_type="cpu", compute_dtype="float32")
    whole = _est(LLAMA_8B, device_type="cpu", compute_dtype="float32", streamed=False)
    params = 32 * ModelShape.from_config(LLAMA_8B).block_params() + 2 * 128256 * 4096 + 4096
    assert whole.host_parts["the whole model (not streamed)"] == params * 4
    # the block being quantized is part of the whole model on the CPU: not counted twice
    assert "block weights" not in whole.host_parts
    assert whole.peak_host - streamed.peak_host == params * 4 - streamed.host_parts["block weights"]


def test_opt_names():
    shape = ModelShape.from_config(dict(model_type="opt", num_hidden_layers=2, hidden_size=64, ffn_dim=256,
                                        num_attention_heads=4, vocab_size=100))
    assert not shape.gated_mlp and shape.intermediate == 256
    assert [g[0] for g in shape.groups()] == ["q/k/v", "o_proj", "fc1", "fc2"]


def test_cli_from_config_only(tmp_path, capsys):
    tiny_config(hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)  # config.json, no weights
    assert not list(tmp_path.glob("*.safetensors"))
    code = main(["memory", "--model", str(tmp_path), "--method", "gptq", "--nsamples", "8", "--seqlen", "32",
                 "--device", "cuda", "--offload-activations", "cpu", "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    expected = estimate_memory(_tiny(hidden_size=128, intermediate_size=256, max_position_embeddings=256), "gptq",
                               nsamples=8, seqlen=32, calib_batch=8, compute_dtype="float16",
                               checkpoint_dtype="float32", store="cpu", device_type="cuda",
                               streamed=False)  # a directory without safetensors shards loads whole
    assert printed["peak_host_bytes"] == expected.peak_host
    assert printed["peak_device_bytes"] == expected.peak_device
    assert main(["memory", "--model", str(tmp_path), "--method", "awq", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "peak host" in out and "memory estimate" in out
    assert main(["memory", "--model", str(tmp_path), "--offload-activations", "disk", str(tmp_path / "acts")]) == 0
    assert "cache on disk" in capsys.readouterr().out
    assert main(["memory", "--model", str(tmp_path), "--offload-activations", "ssd"]) == 2
    assert "--offload-activations" in capsys.readouterr().err


def test_readme_table_is_generated():
    from tritonq.bench.memory_table import table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table() in readme


def test_one_call_from_quantize_options(tmp_path):
    """What a quantize run calls: QuantizeOptions in, the estimate out (AWQ's --search-tokens from the options)."""
    from tritonq.engine.api import QuantizeOptions
    from tritonq.engine.memory import estimate_for_options

    config = _tiny(hidden_size=128, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8)
    opts = QuantizeOptions(output=str(tmp_path / "out"), method="awq", nsamples=16, seqlen=64, calib_batch=4,
                           offload_activations="cpu", method_options={"search_tokens": 128}, device="cpu")
    est = estimate_for_options(opts, config)
    direct = estimate_memory(config, "awq", nsamples=16, seqlen=64, calib_batch=4, compute_dtype="float32",
                             checkpoint_dtype="float32", store="cpu", device_type="cpu", search_tokens=128)
    assert est.peak_host == direct.peak_host and est.settings == direct.settings
    more = estimate_for_options(QuantizeOptions(**{**opts.__dict__, "method_options": {"search_tokens": 1024}}),
                                config)
    assert more.block_rise() > est.block_rise()  # more sampled tokens for the scale search: more cached calls


def test_boa_block_v_holds_a_hessian_per_kv_head(monkeypatch):
    """BoA's --block-v (its default) keeps a K x K Hessian per KV head through the q/k/v stage, plus one chunk of
    query positions' attention while a calibration chunk runs; ``tritonq memory`` follows the method's option."""
    from tritonq.engine import memory
    from tritonq.engine.methods import registry
    m = ModelShape.from_config(_tiny())
    args = dict(c=4, seqlen=16, tokens=64, search_tokens=0, group_size=32, windows=2)
    (obs_off, solve_off), (obs_on, solve_on) = (memory._method_state("boa", m, 64, 128, "q/k/v", block_v=v, **args)
                                                for v in (False, True))
    value = 2 * 64 * 64 * 4  # two KV heads, K = 64, fp32
    transient = 2 * 4 * (16 * 16 + 3 * 16 * 16 + 16 * 64) * 4  # 2 windows, 4 heads, T = 16, chunk 16, D = 16
    assert (obs_on - obs_off, solve_on - solve_off) == (value + transient, value)
    assert (memory._method_state("boa", m, 128, 64, "down_proj", block_v=True, **args)
            == memory._method_state("boa", m, 128, 64, "down_proj", block_v=False, **args))  # only q/k/v holds it

    seen = []
    monkeypatch.setattr(memory, "estimate_memory", lambda *a, **kw: seen.append(kw["block_v"]))

    class Opts:
        method, nsamples, seqlen, calib_batch, group_size = "boa", 4, 16, 2, 64
        device, dtype, offload_activations = "cpu", "float32", None
    for options in ({}, {"block_v": False}):
        Opts.method_options = options
        memory.estimate_for_options(Opts(), _tiny())
    assert registry.make_method("boa", {}).options.block_v  # the default, which the estimate follows
    assert seen == [True, False]
