"""``tritonq report``: the Markdown table from outputs' quantization.json (and packed config.json), exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_tokenizer
from tritonq.cli import main
from tritonq.engine.evaluation.report import markdown_table, read_output, record_evaluation


def _output(path: Path, meta: dict | None = None, config: dict | None = None, weights: dict | None = None) -> Path:
    path.mkdir(parents=True)
    if meta is not None:
        (path / "quantization.json").write_text(json.dumps(meta))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (path / "tokenizer.json").write_bytes(b"x" * 5000)  # not weights: not counted
    for name, size in (weights or {}).items():
        (path / name).write_bytes(b"\0" * size)
    return path


@pytest.fixture
def outputs(tmp_path):
    gptq = _output(tmp_path / "gptq-w4", {
        "method": "gptq", "bits": 4, "group_size": 64, "sym": False, "activations": None,
        "seconds": {"load": 1.5, "quantize_total": 10.26},
        "evaluations": {"perplexity": {"wiki.txt 8x2048": {"perplexity": 20.123, "windows": 8}},
                        "lm_eval": {"arc_easy 0-shot": {"metrics": {"acc": 0.5, "acc_norm": 0.25}, "samples": 4}}},
    }, weights={"model.safetensors": 2**20, "quant_params.safetensors": 3 * 2**19})
    rtn = _output(tmp_path / "rtn-w3", {
        "method": "rtn", "bits": 3, "group_size": 64, "sym": True, "seconds": {"load": 2.0, "save": 0.54},
        "evaluations": {"perplexity": {"wiki.txt 8x2048": {"perplexity": 25.5}}},
    })
    packed = _output(tmp_path / "packed", config={"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 64, "symmetric": False,
                                                  "strategy": "group"}}}}}, weights={"model.safetensors": 2**19})
    sq = _output(tmp_path / "sq", {
        "method": "smoothquant", "bits": 8, "group_size": -1, "sym": True,
        "activations": {"bits": 8, "scheme": "per-token", "sym": True, "dynamic": True}, "seconds": {"load": 3.0},
    })
    return [gptq, rtn, packed, sq]


EXPECTED = """\
| output | method | format | bits | group | grid | bits/weight | activations | ppl wiki.txt 8x2048 | \
arc_easy 0-shot acc | arc_easy 0-shot acc_norm | load s | quantize_total s | save s | weights MiB |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| gptq-w4 | gptq | fake | 4 | 64 | asym | - | - | 20.12 | 0.5000 | 0.2500 | 1.5 | 10.3 | - | 2.5 |
| rtn-w3 | rtn | fake | 3 | 64 | sym | - | - | 25.50 | - | - | 2.0 | - | 0.5 | 0.0 |
| packed | ? | compressed-tensors pack-quantized | 4 | 64 | asym | - | - | - | - | - | - | - | - | 0.5 |
| sq | smoothquant | fake | 8 | -1 | sym | - | A8 per-token sym | - | - | - | 3.0 | - | - | 0.0 |"""


def test_table_across_outputs_is_exact(outputs, capsys):
    assert markdown_table([read_output(d) for d in outputs]) == EXPECTED
    assert main(["report", *map(str, outputs)]) == 0
    assert capsys.readouterr().out.strip() == EXPECTED


def test_json_rows(outputs, capsys):
    assert main(["report", str(outputs[0]), str(outputs[2]), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["gptq", "?"]
    assert rows[0]["perplexities"] == {"wiki.txt 8x2048": 20.123}
    assert rows[0]["weight_bytes"] == 2**20 + 3 * 2**19
    assert rows[1]["out_format"] == "compressed-tensors pack-quantized"


def test_packed_activations_from_the_config(tmp_path):
    d = _output(tmp_path / "w8a8", config={"quantization_config": {"format": "int-quantized", "config_groups": {
        "group_0": {"weights": {"num_bits": 8, "strategy": "channel", "symmetric": True},
                    "input_activations": {"num_bits": 8, "strategy": "token", "symmetric": True}}}}})
    s = read_output(d)
    assert (s.bits, s.group_size, s.sym, s.activations, s.out_format) == (
        8, -1, True, "A8 token sym", "compressed-tensors int-quantized")


def test_record_evaluation_adds_scores_and_times(outputs):
    d = outputs[1]
    (d / "quantization.json").chmod(0o604)
    record_evaluation(d, "perplexity", "c4 4x512", {"perplexity": 31.0}, seconds={"eval": 4.25})
    record_evaluation(d, "perplexity", "wiki.txt 8x2048", {"perplexity": 24.0})  # replaces
    meta = json.loads((d / "quantization.json").read_text())
    assert meta["method"] == "rtn"  # the rest is kept
    assert meta["seconds"] == {"load": 2.0, "save": 0.54, "eval": 4.25}
    s = read_output(d)
    assert s.perplexities == {"wiki.txt 8x2048": 24.0, "c4 4x512": 31.0}
    assert not list(d.glob(".quantization.json.*"))  # no temporary file left behind
    assert (d / "quantization.json").stat().st_mode & 0o777 == 0o604  # the rewrite keeps the permissions


def test_bad_directories_are_one_clear_error(tmp_path, capsys):
    rc = main(["report", str(tmp_path / "missing")])
    assert rc == 2 and "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "float"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    rc = main(["report", str(empty)])
    err = capsys.readouterr().err
    assert rc == 2 and "neither quantization.json nor a quantization_config" in err
    with pytest.raises(Exception, match="no quantization.json"):
        record_evaluation(empty, "perplexity", "x", {"perplexity": 1.0})


def _tiny_model_and_text(tmp_path: Path, seed: int, sentence: str) -> tuple[Path, Path]:
    """A one-layer random Llama saved with the byte tokenizer, and an evaluation text of ``sentence`` repeated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tmp_path / "src"
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text(sentence * 200, encoding="utf-8")
    return src, text


def test_quantize_with_eval_data_records_the_perplexity(tmp_path, capsys):
    src, text = _tiny_model_and_text(tmp_path, 0, "The quick brown fox jumps over the lazy dog. ")
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(src), "--method", "rtn", "--group-size", "32", "--device", "cpu",
                 "--no-progress", "--output", str(out), "--eval-data", str(text), "--eval-windows", "2"]) == 0
    said = capsys.readouterr().out
    s = read_output(out)
    assert list(s.perplexities) == ["text.txt 2x2048"]
    assert f"{s.perplexities['text.txt 2x2048']:.2f}" in said  # the same number the summary line printed
    assert {"load", "quantize_total", "save", "eval"} <= set(s.seconds)
    # and `tritonq eval --record` adds a second score beside it, from the same model
    assert main(["eval", str(out), "--data", str(text), "--seqlen", "128", "--max-windows", "3", "--record",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    s = read_output(out)
    assert set(s.perplexities) == {"text.txt 2x2048", "text.txt 3x128"}
    assert f"{s.perplexities['text.txt 3x128']:.4f}" in printed


def test_packed_outputs_keep_method_times_and_score(tmp_path, capsys):
    """``quantize --format compressed-tensors`` and ``pack`` keep the source's record (marked with the format):
    the report shows the method and stage times of the packed output, and ``eval --record`` works on it."""
    src, text = _tiny_model_and_text(tmp_path, 1, "A packed model keeps its record. ")
    packed, fake, repacked = tmp_path / "ct", tmp_path / "fake", tmp_path / "gptq"
    common = ["--model", str(src), "--method", "rtn", "--group-size", "32", "--device", "cpu", "--no-progress"]
    assert main(["quantize", *common, "--output", str(packed), "--format", "compressed-tensors",
                 "--eval-data", str(text), "--eval-windows", "2"]) == 0
    assert main(["quantize", *common, "--output", str(fake), "--eval-data", str(text), "--eval-windows", "2"]) == 0
    assert main(["pack", str(fake), "--format", "gptq", "--output", str(repacked)]) == 0
    capsys.readouterr()
    s, f, r = read_output(packed), read_output(fake), read_output(repacked)
    assert (s.method, s.out_format, s.bits, s.group_size) == ("rtn", "compressed-tensors", 4, 32)
    assert {"load", "quantize_total", "save", "eval"} <= set(s.seconds)
    # the same grid; model-free RTN scores what it wrote: the packed model runs its int4 layers (another
    # summation order than the fake float model), so the scores agree closely but not to the last bits
    assert s.perplexities == pytest.approx(f.perplexities, rel=1e-4)
    assert (r.method, r.out_format, r.perplexities) == ("rtn", "gptq", {})  # the fake model's scores stay behind
    # bits per weight by hand: 4 + 16/32 (fp16 scale) + 4/32 (packed zero) = 4.625; GPTQ adds a 32-bit g_idx per
    # input column: 7 linears, 6 with K = 64 and down_proj with K = 96, over 30720 weights: +15360/30720 = 0.5
    assert (s.bits_per_weight, f.bits_per_weight, r.bits_per_weight) == (4.625, 4.625, 5.125)
    assert main(["eval", str(repacked), "--data", str(text), "--seqlen", "128", "--max-windows", "2", "--record",
                 "--device", "cpu"]) == 0
    assert set(read_output(repacked).perplexities) == {"text.txt 2x128"}


@pytest.mark.parametrize("bits, group, sym, fmt, per_weight", [
    (4, 128, False, "fake", 4 + 16 / 128 + 4 / 128),  # codes, fp16 scale, packed 4-bit zero per group
    (4, 128, True, "compressed-tensors", 4 + 16 / 128),  # symmetric: no zero point stored
    (4, 128, True, "gptq", 4 + 16 / 128 + 4 / 128 + 32 / 256),  # qzeros always, g_idx 32 bits per column (N=256)
    (4, 128, False, "awq", 4 + 16 / 128 + 4 / 128),
    (4, 32, True, "gguf", 4.5),  # Q4_0
    (4, 32, False, "gguf", 5.0),  # Q4_1: fp16 scale and fp16 minimum per 32
    (8, 32, True, "gguf", 8.5),  # Q8_0
    (3, -1, False, "fake", 3 + 16 / 512 + 3 / 512),  # per channel: one group of K = 512
])
def test_bits_per_weight_by_hand(bits, group, sym, fmt, per_weight):
    from tritonq.engine.bits import linear_bits
    from tritonq.engine.grid import GridSpec

    rows, cols = 256, 512
    assert linear_bits(GridSpec(bits, group, sym), rows, cols, fmt) == pytest.approx(per_weight * rows * cols,
                                                                                     abs=1e-9)


def test_average_bits_weights_each_linear_by_its_size_and_counts_float_as_16():
    from tritonq.engine.bits import average_bits
    from tritonq.engine.grid import GridSpec
    from tritonq.errors import TritonqError

    shapes = {"a": (64, 128), "b": (32, 64), "c": (64, 64)}
    grids = {"a": GridSpec(4, 64, False), "b": GridSpec(8, -1, True)}  # c: left in float
    a = 64 * 128 * (4 + 16 / 64 + 4 / 64)
    b = 32 * 64 * (8 + 16 / 64)
    c = 64 * 64 * 16
    assert average_bits(grids, shapes) == pytest.approx((a + b + c) / (64 * 128 + 32 * 64 + 64 * 64))
    with pytest.raises(TritonqError, match="cannot count bits for format 'exl2'"):
        average_bits(grids, shapes, "exl2")


def test_plot_series_use_average_bits_where_an_output_gives_them():
    from tritonq.bench.plots import perplexity_series
    from tritonq.engine.evaluation.report import OutputSummary

    mixed = OutputSummary(Path("mix"), "recipe", 3, 64, False, "", "fake", perplexities={"wiki": 40.0},
                          bits_per_weight=3.432)
    uniform = OutputSummary(Path("w3"), "recipe", 3, 64, False, "", "fake", perplexities={"wiki": 55.0})
    assert perplexity_series([mixed, uniform]) == {"wiki": {"recipe": [(3, 55.0), (3.432, 40.0)]}}
