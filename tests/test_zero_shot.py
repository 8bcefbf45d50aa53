"""``tritonq eval --tasks``: lm-eval on our loaded model, end to end on a local task (tests/lm_eval_tasks/).

The oracle is a plain transcription of what a multiple-choice task scores: for each question, the float64
log-likelihood of every ``" " + choice`` after the prompt; ``acc`` is the share of questions whose best choice
is the answer, ``acc_norm`` the same with the log-likelihood divided by the choice's length in characters. The tiny
model is random, so its accuracy is whatever the weights give, and lm-eval must report exactly that.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_fake_dir
from tritonq.cli import main

TASKS = Path(__file__).with_name("lm_eval_tasks")
TASK = "tritonq_tiny_mc"
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval not installed (pip install 'tritonq[eval]'; .ci/run installs it)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_fake_dir(tmp_path_factory.mktemp("zs") / "tiny", seed=3)


def _examples() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]


def _oracle(model_dir: Path, n: int | None = None) -> dict[str, float]:
    """acc and acc_norm of the float (fake-quantized) model, from float64 log-likelihoods of each choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    hits = hits_norm = 0
    examples = _examples()[:n]
    for ex in examples:
        context = tok(f"Question: {ex['question']}\nAnswer:", add_special_tokens=False).input_ids
        lls, norms = [], []
        for choice in ex["choices"]:
            cont = tok(" " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            ll = sum(float(logp[len(context) + i - 1, t]) for i, t in enumerate(cont))
            lls.append(ll)
            norms.append(ll / len(choice))  # lm-eval divides by the choice's length in characters
        hits += int(max(range(len(lls)), key=lls.__getitem__) == ex["answer"])
        hits_norm += int(max(range(len(norms)), key=norms.__getitem__) == ex["answer"])
    return {"acc": hits / len(examples), "acc_norm": hits_norm / len(examples)}


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _task_args(model_dir, *extra) -> list[str]:
    return ["eval", str(model_dir), "--tasks", TASK, "--include-path", str(TASKS), "--device", "cpu", *extra]


@needs_lm_eval
def test_local_task_end_to_end_matches_the_oracle_and_is_recorded(tiny_dir, capsys):
    rc, out, _ = _run(_task_args(tiny_dir, "--json", "--record"), capsys)
    assert rc == 0
    res = json.loads(out)
    score = res["lm_eval"]["tasks"][TASK]
    assert score["samples"] == 6
    assert 0.0 <= score["metrics"]["acc"] <= 1.0
    assert 0.0 <= score["metrics"]["acc_norm"] <= 1.0
    want = _oracle(tiny_dir)
    assert score["metrics"]["acc"] == pytest.approx(want["acc"], abs=1e-12)
    assert score["metrics"]["acc_norm"] == pytest.approx(want["acc_norm"], abs=1e-12)
    assert set(score["stderr"]) == {"acc", "acc_norm"}
    assert "perplexity" not in res  # --tasks alone runs no perplexity
    meta = json.loads((tiny_dir / "quantization.json").read_text())
    recorded = meta["evaluations"]["lm_eval"][f"{TASK} 0-shot"]
    assert recorded["metrics"] == score["metrics"]
    assert recorded["samples"] == 6 and recorded["limit"] is None


@needs_lm_eval
def test_limit_scores_only_the_first_examples(tiny_dir, capsys):
    rc, out, _ = _run(_task_args(tiny_dir, "--limit", "2", "--batch-size", "3", "--json"), capsys)
    assert rc == 0
    res = json.loads(out)["lm_eval"]
    assert res["limit"] == 2 and res["batch_size"] == 3
    score = res["tasks"][TASK]
    assert score["samples"] == 2
    assert score["metrics"]["acc"] == pytest.approx(_oracle(tiny_dir, 2)["acc"], abs=1e-12)


@needs_lm_eval
def test_packed_output_scores_like_the_fake_quantized_one(tiny_dir, tmp_path, capsys):
    from tritonq.engine.formats.registry import save_packed

    packed = save_packed(tiny_dir, tmp_path / "packed", "compressed-tensors")
    rc, out, err = _run(_task_args(packed), capsys)
    assert rc == 0, err
    assert f"| {TASK} | acc |" in out  # the Markdown table
    line = next(row for row in out.splitlines() if row.startswith(f"| {TASK} | acc |"))
    assert float(line.split("|")[3]) == pytest.approx(_oracle(tiny_dir)["acc"], abs=1e-4)


@needs_lm_eval
def test_task_whose_data_is_not_available_offline_is_named(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = ["eval", str(tiny_dir), "--tasks", "tritonq_missing_data", "--include-path", str(TASKS), "--device", "cpu"]
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert "tritonq_missing_data" in err and "cannot load the data" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback


def test_missing_lm_eval_names_the_extra(tiny_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    rc, _, err = _run(_task_args(tiny_dir), capsys)
    assert rc == 2
    assert "pip install 'tritonq[eval]'" in err


def test_task_flags_without_tasks_and_bad_values_fail_before_work(tiny_dir, tmp_path, capsys):
    rc, _, err = _run(["eval", str(tiny_dir), "--limit", "3", "--device", "cpu"], capsys)
    assert rc == 2 and "--limit" in err and "--tasks" in err
    rc, _, err = _run(["eval", str(tiny_dir), "--tasks", "a,,b", "--device", "cpu"], capsys)
    assert rc == 2 and "empty task name" in err
    float_dir = tmp_path / "float"
    float_dir.mkdir()
    (float_dir / "config.json").write_text("{}")
    rc, _, err = _run(["eval", str(float_dir), "--tasks", TASK, "--record"], capsys)
    assert rc == 2 and "quantization.json" in err
