"""The defaults sweep (bench/method_defaults.py, issue 22 item 0): settings parsing, the table from a log, the
GPTQ short form, and the CLI's ``--no-FLAG`` for boolean options whose default may be True."""

from __future__ import annotations

import json
import math
import random

import pytest
from tritonq.bench import gptq_defaults, method_defaults
from tritonq.cli import build_parser
from tritonq.commands import method_options_from_args
from tritonq.errors import TritonqError


def test_settings_parse_to_typed_options():
    assert method_defaults.parse_setting("act_order_col=1,block_v=0,qparam=hessian,damp=0.05", "boa") == \
        ("boa", {"act_order_col": True, "block_v": False, "qparam": "hessian", "damp": 0.05})
    assert method_defaults.parse_setting("gptq:act_order=none,block_size=64", "boa") == \
        ("gptq", {"act_order": "none", "block_size": 64})
    assert method_defaults.parse_setting("dh-awq:max_flip_percent=0.02", "boa") == \
        ("dh-awq", {"max_flip_percent": 0.02})
    assert method_defaults.parse_setting("awq+gptq", "boa") == ("awq+gptq", {})
    assert method_defaults.parse_setting("default", "aboa") == ("aboa", {})


@pytest.mark.parametrize("setting, message", [("boa:act_order=static", "boa has no option 'act_order'"),
                                              ("act_order_col=yes", "not a boolean"),
                                              ("nomethod", "unknown method")])
def test_bad_settings_name_the_problem(setting, message):
    with pytest.raises(TritonqError, match=message):
        method_defaults.parse_setting(setting, "boa")


def test_labels_name_the_given_options_only():
    assert method_defaults.label("boa", {"act_order_col": True, "qparam": "hessian"}) == \
        "boa:act_order_col=1,qparam=hessian"
    assert method_defaults.label("gptq", {}) == "gptq (defaults)"


def test_gptq_short_settings_map_to_method_settings():
    assert gptq_defaults.gptq_setting("static:0.1") == "gptq:act_order=static,damp=0.1"
    assert gptq_defaults.gptq_setting("rtn") == "rtn"
    method, options = method_defaults.parse_setting(gptq_defaults.gptq_setting("none:0.01"), "gptq")
    assert (method, options) == ("gptq", {"act_order": "none", "damp": 0.01})


def test_table_from_log_reports_mean_sd_and_the_first_windows(tmp_path, capsys):
    rng = random.Random()
    rows = []
    for setting in ("gptq (defaults)", "boa:act_order_col=1"):
        for seed in (0, 1, 2):
            rows.append({"bits": 3, "group_size": -1, "setting": setting, "seed": seed, "quantize_s": 1.0,
                         "losses": {"heldout": [rng.uniform(2, 3) for _ in range(5)],
                                    "wiki.txt": [rng.uniform(3, 5) for _ in range(8)]}})
    log = tmp_path / "sweep.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert method_defaults.main(["--log", str(log), "--table-only", "--check-windows", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| bits | group | setting | seeds | held-out pydoc | wiki.txt (4 w) | wiki.txt (8 w) |"
    boa = [line for line in out if "boa:act_order_col=1" in line][0].split(" | ")
    first4 = [math.exp(sum(r["losses"]["wiki.txt"][:4]) / 4) for r in rows if r["setting"] == "boa:act_order_col=1"]
    mean = sum(first4) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in first4) / 2)
    assert boa[1] == "channel" and boa[3] == "0,1,2"
    assert boa[5] == f"{mean:.2f} ± {sd:.2f}"


@pytest.mark.parametrize("flags, expected", [(["--act-order-col"], {"act_order_col": True}),
                                             (["--no-act-order-col"], {"act_order_col": False}),
                                             (["--no-block-v", "--qparam", "minmax"],
                                              {"block_v": False, "qparam": "minmax"}),
                                             (["--method", "awq", "--no-clip"], {"no_clip": True}),
                                             ([], {})])
def test_boolean_options_can_be_turned_off(flags, expected):
    # a --method among the flags overrides boa
    args = build_parser().parse_args(["quantize", "--method", "boa", "--output", "out", *flags])
    assert method_options_from_args(args) == expected


def test_gptq_defaults_passes_its_settings_on_rewritten(monkeypatch):
    seen = []
    monkeypatch.setattr(method_defaults, "main", lambda argv: seen.append(argv) or 0)
    gptq_defaults.main(["--bits", "3", "--settings", "rtn", "static:0.1", "--seeds", "0"])
    assert seen[-1] == ["--method", "gptq", "--bits", "3", "--settings", "rtn", "gptq:act_order=static,damp=0.1",
                        "--seeds", "0"]


def test_boa_default_run_is_the_chosen_setting(tiny_dir, tmp_path):
    """The default BoA run changed on purpose (issue 22): it equals ``--act-order-col --block-v`` byte for byte and
    differs from the old default, now ``--no-act-order-col --no-block-v``."""
    import hashlib

    from tritonq.cli import main

    calib = tmp_path / "calib.txt"
    words = [random.choice(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"]) for _ in range(2000)]
    calib.write_text(" ".join(words), encoding="utf-8")
    digests = {}
    for run, flags in {"default": [], "chosen": ["--act-order-col", "--block-v"],
                       "old": ["--no-act-order-col", "--no-block-v"]}.items():
        out = tmp_path / run
        assert main(["quantize", "--model", str(tiny_dir), "--calib", str(calib), "--nsamples", "4", "--seqlen", "64",
                     "--group-size", "32", "--device", "cpu", "--no-progress", "--method", "boa", "--output",
                     str(out), *flags]) == 0
        digests[run] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digests["default"] == digests["chosen"] != digests["old"]
