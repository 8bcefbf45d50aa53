"""``--resume`` (engine/workdir.py): a run killed with SIGKILL continues from its last finished block and writes the
same bytes as a run that was never interrupted; a different run's work directory is refused with what differs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from tritonq.engine.outputs import QUANT_JSON

ROOT = Path(__file__).resolve().parents[1]

# The quantize CLI in a child process that SIGKILLs itself at a chosen point of the work directory's commits:
# "after K" once block K is committed; "inside K" after block K's tensors are written but before its commit mark;
# "tuned 0" once the scale tuning's files are committed.
KILLER = textwrap.dedent("""
    import os, signal, sys
    import tritonq.engine.workdir as w
    where, block = sys.argv[1], int(sys.argv[2])
    commit, save_json = w.WorkDir.commit_block, w._write_json
    def commit_block(self, index, *args, **kwargs):
        if where == "inside" and index == block:
            w._write_json = lambda path, content: (os.kill(os.getpid(), signal.SIGKILL)
                                                   if path.name == w.PROGRESS else save_json(path, content))
        commit(self, index, *args, **kwargs)
        if where == "after" and index == block:
            os.kill(os.getpid(), signal.SIGKILL)
    w.WorkDir.commit_block = commit_block
    commit_tuned = w.WorkDir.commit_tuned
    def after_tuning(self, *args, **kwargs):
        commit_tuned(self, *args, **kwargs)
        if where == "tuned":
            os.kill(os.getpid(), signal.SIGKILL)
    w.WorkDir.commit_tuned = after_tuning
    from tritonq.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("resume") / "model"
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_config(num_hidden_layers=4)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "gptq", "--nsamples", "8", "--seqlen", "64",
            "--group-size", "32", "--output", str(out), "--no-progress", *extra]


def _cli(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if kill is None:
        cmd = [sys.executable, "-m", f"{ROOT.name}.cli", *args]
    else:
        cmd = [sys.executable, "-c", KILLER, kill[0], str(kill[1]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _weights(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
            for name in ("model.safetensors", "quant_params.safetensors", "config.json")}


@pytest.fixture(scope="module")
def uninterrupted(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    done = _cli(_args(model_dir, out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("kill", [("after", 0), ("inside", 2)])
def test_killed_then_resumed_is_byte_identical(model_dir, uninterrupted, tmp_path, kill):
    out = tmp_path / "out"
    work = tmp_path / "out.tritonq-work"
    killed = _cli(_args(model_dir, out), kill=kill)
    assert killed.returncode == -9
    assert not out.exists() and work.is_dir()
    finished = json.loads((work / "progress.json").read_text())["done"]
    assert finished == (kill[1] + 1 if kill[0] == "after" else kill[1])

    again = _cli(_args(model_dir, out))  # without --resume the directory is not silently reused
    assert again.returncode != 0 and "--resume" in again.stderr

    resumed = _cli(_args(model_dir, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _weights(out) == _weights(uninterrupted)
    meta = json.loads((out / QUANT_JSON).read_text())
    assert meta["resumed_from_block"] == finished
    redone = [b["block"] for b in meta["memory"]["per_block"] if "host_peak_mb" in b and not b.get("resumed")]
    assert redone == list(range(finished, 4))  # the finished blocks were not quantized again
    assert not work.exists()


def test_resume_refuses_another_run(model_dir, tmp_path):
    out = tmp_path / "out"
    assert _cli(_args(model_dir, out), kill=("after", 1)).returncode == -9
    other = _cli(_args(model_dir, out, "--resume", "--bits", "3"))
    assert other.returncode != 0
    assert "another run" in other.stderr and "bits: 4 -> 3" in other.stderr
    assert not out.exists()
    fresh = _cli(_args(model_dir, out, "--overwrite", "--bits", "3"))  # --overwrite starts over
    assert fresh.returncode == 0, fresh.stderr
    assert json.loads((out / QUANT_JSON).read_text()).get("resumed_from_block") is None


TUNE = ("--tune-epochs", "1", "--tune-batch", "4")


@pytest.mark.parametrize("kill", [("after", 3), ("tuned", 0)])
def test_scale_tuning_resumes_byte_identical(model_dir, tmp_path, kill):
    """Killed after the last block (the tuning runs on the resumed blocks) or after the tuning's commit (the resume
    writes the tuned files without tuning again): the same bytes as a run never interrupted. A resume with other
    tuning settings tunes again from the blocks."""
    full = tmp_path / "full"
    assert _cli(_args(model_dir, full, *TUNE)).returncode == 0
    out = tmp_path / "out"
    assert _cli(_args(model_dir, out, *TUNE), kill=kill).returncode == -9
    resumed = _cli(_args(model_dir, out, *TUNE, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _weights(out) == _weights(full)
    log = json.loads((out / QUANT_JSON).read_text())["scale_tuning"]
    assert log.get("resumed") is (True if kill[0] == "tuned" else None) and log["kl_end"] < log["kl_start"]
    if kill[0] == "tuned":
        other = tmp_path / "other"
        assert _cli(_args(model_dir, other, *TUNE), kill=kill).returncode == -9
        retuned = _cli(_args(model_dir, other, "--tune-epochs", "2", "--resume"))
        assert retuned.returncode == 0, retuned.stderr
        assert json.loads((other / QUANT_JSON).read_text())["scale_tuning"]["epochs"] == 2
        assert _weights(other)["model.safetensors"] != _weights(full)["model.safetensors"]
