"""Bad input: one clear line naming the problem and the fix, exit status 2, no traceback, no output."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_tokenizer
from tritonq.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    return path


def _run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("tritonq:")]
    return rc, lines


def _quantize_args(model, calib, out, *extra):
    return ["quantize", "--model", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "64",
            "--group-size", "32", "--device", "cpu", "--no-progress", "--output", str(out), *extra]


CASES = {
    "group": (["--group-size", "48"], "group size 48 does not divide the input width 64"),
    "bits": (["--bits", "9"], "bits must be an integer from 2 to 8"),
    "method": (["--method", "magic"], "unknown method 'magic'; choose one of: rtn, gptq"),
    "format": (["--format", "zip"], "unknown --format 'zip'"),
    "foreign_option": (["--method", "rtn", "--damp", "0.1"], "--damp does not apply to --method rtn"),
    "few_tokens": (["--nsamples", "500", "--seqlen", "512"], "fewer than --nsamples 500 x --seqlen 512"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_quantize_arguments(case, tiny_dir, calib, tmp_path, capsys):
    extra, message = CASES[case]
    out = tmp_path / "out"
    rc, err = _run(_quantize_args(tiny_dir, calib, out, *extra), capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("tritonq: error: ") and message in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_model(calib, tmp_path, capsys):
    rc, err = _run(_quantize_args(tmp_path / "no" / "such" / "model", calib, tmp_path / "out"), capsys)
    assert rc == 2 and "cannot load" in err[-1] or "does not exist" in err[-1]
    assert not (tmp_path / "out").exists()


def test_missing_calibration_file(tiny_dir, tmp_path, capsys):
    rc, err = _run(_quantize_args(tiny_dir, tmp_path / "missing.txt", tmp_path / "out"), capsys)
    assert rc == 2 and "data file" in err[-1] and "not found" in err[-1]


def test_hub_dataset_offline(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = _run(_quantize_args(tiny_dir, "c4", tmp_path / "out"), capsys)
    assert rc == 2 and "could not load the hub dataset 'c4'" in err[-1] and "local file" in err[-1]


def test_non_empty_output_needs_overwrite(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err = _run(_quantize_args(tiny_dir, calib, out, "--method", "rtn"), capsys)
    assert rc == 2 and "is not empty; pass --overwrite" in err[-1]
    assert (out / "keep.txt").exists()


def test_non_finite_hessian(tmp_path, calib, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=259)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    model.save_pretrained(tmp_path / "bad")
    tiny_tokenizer().save_pretrained(tmp_path / "bad")
    rc, err = _run(_quantize_args(tmp_path / "bad", calib, tmp_path / "out"), capsys)
    assert rc == 2 and "non-finite values in the Hessian of model.layers.0.self_attn.q_proj" in err[-1]
    assert not (tmp_path / "out").exists()


def test_eval_missing_file(tiny_dir, tmp_path, capsys):
    rc, err = _run(["eval", str(tiny_dir), "--data", str(tmp_path / "nope.txt"), "--device", "cpu"], capsys)
    assert rc == 2 and "not found" in err[-1]


def test_quantize_then_eval_json(tiny_dir, calib, tmp_path, capsys):
    out = tmp_path / "new" / "q"  # missing parents are created
    assert main(_quantize_args(tiny_dir, calib, out, "--method", "gptq")) == 0
    summary = capsys.readouterr().out
    assert "Quantized" in summary and str(out) in summary
    assert main(["eval", str(out), "--data", str(calib), "--seqlen", "128", "--max-windows", "3", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 384 and result["perplexity"] > 1
    # the packed int4 export evaluates through QuantLinear to the same perplexity
    assert main(["pack", str(out), "--format", "gptq_v2", "--output", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "packed"), "--data", str(calib), "--seqlen", "128", "--max-windows", "3",
                 "--json", "--device", "cpu"]) == 0
    packed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert packed["perplexity"] == pytest.approx(result["perplexity"], rel=1e-4)


def test_console_script_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "tritonq.cli", "quantize", "--bits", "1", "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "tritonq: error: bits must be an integer from 2 to 8, got 1; pass e.g. --bits 4"
