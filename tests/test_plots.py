"""bench/plots.py: what each plot draws (the data it extracts, exactly), and that the PNG is written atomically."""

from __future__ import annotations

import json
import sys

import pytest
from tritonq.bench.plots import decode_bounds, decode_rates, matmul_speedups, perplexity_series
from tritonq.cli import main
from tritonq.engine.evaluation.report import OutputSummary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
needs_matplotlib = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed (pip install 'tritonq[plot]')")


def _quant_dir(root, name, method, bits, ppl, act=None):
    d = root / name
    d.mkdir()
    meta = {"method": method, "bits": bits, "group_size": 64, "sym": False, "activations": act,
            "evaluations": {"perplexity": {"wiki 8x2048": {"perplexity": ppl}}}}
    (d / "quantization.json").write_text(json.dumps(meta))
    return d


MATMUL = {"device": "NVIDIA H100", "mode": "cuda", "rows": [
    {"M": 16, "K": 4096, "N": 4096, "speedup": 1.5}, {"M": 1, "K": 4096, "N": 4096, "speedup": 2.5},
    {"M": 1, "K": 4096, "N": 14336, "speedup": 3.5}],
    "w8a8_rows": [{"M": 1, "K": 4096, "N": 4096, "speedup_vs_fp16": 0.9}]}
DECODE_NOW = {"device": "cpu", "packed": {"prefill_ms": 10.0, "decode_tokens_per_s": 30.0},
              "float": {"prefill_ms": 12.0, "decode_tokens_per_s": 15.0}, "speedup": 2.0}
DECODE_SPREAD = [{"model": "smollm2", "packed": {"decode_tokens_per_s": {"median": 40.0, "min": 38.0, "max": 41.0},
                                                 "decode_bound_tokens_per_s": 95.0,
                                                 "prefill_tokens_per_s": {"median": 900.0}},
                  "float": {"decode_tokens_per_s": {"median": 20.0, "min": 19.0, "max": 22.0}}},
                 {"model": "llama-2048", "packed": {"decode_tokens_per_s_median": 8.0, "decode_tokens_per_s_min": 7.0,
                                                    "decode_tokens_per_s_max": 9.0},
                  "float": {"decode_tokens_per_s_median": 3.0}}]


def test_perplexity_series_per_method_sorted_by_bits():
    from pathlib import Path

    def s(method, bits, ppl, act=""):
        return OutputSummary(Path(method), method, bits, 64, False, act, "fake", perplexities={"wiki": ppl})

    series = perplexity_series([s("gptq", 4, 20.0), s("gptq", 2, 90.0), s("gptq", 3, 30.0), s("rtn", 3, 40.0),
                                s("smoothquant", 8, 19.0, "A8 per-token sym")])
    assert series == {"wiki": {"gptq": [(2, 90.0), (3, 30.0), (4, 20.0)], "rtn": [(3, 40.0)],
                               "smoothquant A8 per-token sym": [(8, 19.0)]}}


def test_matmul_speedups_by_shape_sorted_by_m():
    assert matmul_speedups(MATMUL) == {
        "int4 dequant-matmul vs fp16 matmul": {"4096x4096": [(1, 2.5), (16, 1.5)], "4096x14336": [(1, 3.5)]},
        "W8A8 vs fp16 matmul": {"4096x4096": [(1, 0.9)]}}
    assert matmul_speedups({"mode": "interpreter", "rows": [{"M": 1, "K": 256, "N": 128, "max_abs_err": 0.0}]}) == {}


def test_decode_rates_read_today_and_median_spread_shapes():
    assert decode_rates(DECODE_NOW) == {"decode": {"model": {"packed": (30.0, None, None),
                                                             "float": (15.0, None, None)}}}
    assert decode_rates(DECODE_SPREAD) == {
        "decode": {"smollm2": {"packed": (40.0, 38.0, 41.0), "float": (20.0, 19.0, 22.0)},
                   "llama-2048": {"packed": (8.0, 7.0, 9.0), "float": (3.0, None, None)}},
        "prefill": {"smollm2": {"packed": (900.0, None, None)}}}
    assert decode_bounds(DECODE_SPREAD) == {"smollm2": {"packed": 95.0}}  # drawn as a mark, never read as a rate


@needs_matplotlib
def test_report_plot_writes_a_png_atomically(tmp_path, capsys):
    dirs = [_quant_dir(tmp_path, "g4", "gptq", 4, 20.0), _quant_dir(tmp_path, "g3", "gptq", 3, 30.0),
            _quant_dir(tmp_path, "r3", "rtn", 3, 40.0)]
    png = tmp_path / "plots" / "ppl.png"
    png.parent.mkdir()
    png.write_bytes(b"old")  # replaced, keeping its permissions
    png.chmod(0o640)
    assert main(["report", *map(str, dirs), "--plot", str(png)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert png.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in png.parent.iterdir()] == ["ppl.png"]  # no temporary file left
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@needs_matplotlib
def test_report_plot_without_perplexities_is_a_clear_error(tmp_path, capsys):
    d = tmp_path / "x"
    d.mkdir()
    (d / "quantization.json").write_text(json.dumps({"method": "rtn", "bits": 4}))
    assert main(["report", str(d), "--plot", str(tmp_path / "p.png")]) == 2
    assert "records a perplexity" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


@needs_matplotlib
@pytest.mark.parametrize("kind,result", [("matmul", MATMUL), ("decode", DECODE_NOW), ("decode", DECODE_SPREAD)])
def test_plot_saved_bench_results(kind, result, tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps(result))
    assert main(["plot", kind, str(src), "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)


@needs_matplotlib
def test_interpreter_matmul_result_cannot_be_plotted(tmp_path, capsys):
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"mode": "interpreter", "speed_measured": False, "rows": [{"M": 1, "K": 2, "N": 2}]}))
    assert main(["plot", "matmul", str(src), "-o", str(tmp_path / "p.png")]) == 2
    assert "no GPU" in capsys.readouterr().err


def test_bench_matmul_plot_needs_a_gpu_and_fails_before_work(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "matmul", "--plot", str(tmp_path / "m.png")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_bad_plot_names_and_missing_matplotlib(tmp_path, capsys, monkeypatch):
    d = _quant_dir(tmp_path, "g4", "gptq", 4, 20.0)
    for bad, why in ((tmp_path / "p.jpg", "ending in .png"), (tmp_path / "nodir" / "p.png", "does not exist")):
        assert main(["report", str(d), "--plot", str(bad)]) == 2
        err = capsys.readouterr().err
        assert why in err or not HAVE_MPL  # without matplotlib, that error comes first
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(d), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'tritonq[plot]'" in capsys.readouterr().err
