"""Per-layer grids: a toy method puts 8 bits on every ``down_proj`` and 4 elsewhere; each format records it.

The toy (``Down8``) lives only here: RTN whose ``Method.layer_grid`` gives ``mlp.down_proj`` 8 bits. Its run
round-trips through the fake output (``quant_params.safetensors`` records each layer's grid), compressed-tensors
(one config group per scheme), gptq / gptq_v2 (GPTQModel's per-module ``dynamic`` overrides) and GGUF (Q8_0
tensors beside Q4_0, symmetric only). AWQ refuses before calibration: its config holds one grid. The packed
model runs under ``tritonq eval`` and ``generate``; 8-bit grouped layers run as dense float linears built at
load, whose logits must equal the fake-quantized model's to float32 rounding (``LOGIT_TOL``, as test_formats).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from test_gguf import bpe_tokenizer, gguf_export_config
from test_pipeline import pydoc_corpus
from tritonq.cli import main
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.formats.checkpoint import read_source, source_layers
from tritonq.engine.formats.registry import read_packed, save_packed
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.registry import METHODS, register
from tritonq.engine.methods.rtn import RTN
from tritonq.errors import TritonqError

LOGIT_TOL = 1e-4
DOWN = "mlp.down_proj"


class Down8(RTN):
    """RTN with 8-bit ``down_proj`` layers and the run's grid everywhere else (a test-only mixed-precision toy)."""

    name = "toy-down8"
    summary = "RTN, 8-bit down_proj (tests/test_mixed_precision.py)"

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        return dataclasses.replace(spec, bits=8) if name.endswith(DOWN) else spec


@pytest.fixture(scope="module", autouse=True)
def _registered():
    """The toy method, registered for this file's tests only (its module fixtures quantize with it)."""
    register(Down8)
    yield
    METHODS.pop(Down8.name, None)


def _bits(name: str) -> int:
    return 8 if name.endswith(DOWN) else 4


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """The toy's fake output of a tiny random Llama (symmetric g32, so GGUF can hold it too)."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(11)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(root / "float")
    bpe_tokenizer().save_pretrained(root / "float")
    quantize(QuantizeOptions(output=str(root / "fake"), model=str(root / "float"), method=Down8.name, bits=4,
                             group_size=32, sym=True, device="cpu", progress=False))
    return root / "fake"


def _source_records(src: Path) -> dict:
    _, spec, meta = read_source(src)
    return dict(source_layers(src, spec, meta["layers"]))


def test_fake_output_records_each_layers_grid(fake):
    params = load_file(str(fake / "quant_params.safetensors"))
    weights = load_file(str(fake / "model.safetensors"))
    names = json.loads((fake / "quantization.json").read_text())["layers"]
    assert len(names) == 14
    for name in names:
        assert params[f"{name}.grid"].tolist() == [_bits(name), 32, 1], name
        levels = torch.unique(weights[f"{name}.weight"][0, :32]).numel()  # one group of one row
        assert (levels > 16) == (_bits(name) == 8), (name, levels)  # 8 bits: more levels than 4 bits allow
    records = _source_records(fake)
    assert {int(q.codes.max()) > 15 for n, q in records.items() if n.endswith(DOWN)} == {True}


def test_old_quant_params_without_grids_still_read(fake, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from tritonq.engine.formats.checkpoint import FakeDirectory

    from .helpers import make_fake_dir

    before = make_fake_dir(tmp_path / "before", bits=4, group_size=32)  # written as before per-layer grids
    assert not [k for k in load_file(str(before / "quant_params.safetensors")) if k.endswith(".grid")]
    grids = FakeDirectory(before).grids
    assert len(grids) == 14 and {(g.bits, g.group_size) for g in grids.values()} == {(4, 32)}
    assert len(save_packed(before, tmp_path / "packed", "gptq_v2").name) > 0
    # a mixed run stripped of its grids is refused loudly (down_proj is not a 4-bit grid), never mis-packed
    old = tmp_path / "stripped"
    shutil.copytree(fake, old)
    params = load_file(str(old / "quant_params.safetensors"))
    save_file({k: v for k, v in params.items() if not k.endswith(".grid")}, str(old / "quant_params.safetensors"))
    with pytest.raises(TritonqError, match=r"down_proj: zero points must lie in 0\.\.15"):
        save_packed(old, tmp_path / "bad", "compressed-tensors")


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gptq_v2"])
def test_packed_formats_round_trip_per_layer_grids(fake, tmp_path, fmt):
    out = save_packed(fake, tmp_path / fmt, fmt)
    expected = _source_records(fake)
    got = {name: (spec, q) for name, spec, q in read_packed(out)}
    assert set(got) == set(expected)
    for name, (spec, q) in got.items():
        assert (spec.bits, spec.group_size, spec.sym) == (_bits(name), 32, True), name
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(q, field), getattr(expected[name], field)), (name, field)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        groups = qcfg["config_groups"]
        assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
        by_bits = {g["weights"]["num_bits"]: set(g["targets"]) for g in groups.values()}
        assert by_bits[8] == {n for n in expected if n.endswith(DOWN)}
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qcfg)  # the library parses the two groups
    else:
        assert qcfg["bits"] == 4
        overrides = {k: v for k, v in qcfg["dynamic"].items() if k.startswith("+:")}
        assert len(overrides) == 2 and all(v == {"bits": 8, "group_size": 32, "sym": True}
                                            for v in overrides.values())


def test_gguf_writes_q8_0_for_the_8_bit_layers(fake, tmp_path):
    out = save_packed(fake, tmp_path / "gguf", "gguf")
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors if t.name.startswith("blk.")
             and t.name.split(".")[2] in ("ffn_down", "ffn_up", "attn_v")}
    q = gguf.GGMLQuantizationType
    assert {k for n, k in kinds.items() if ".ffn_down." in n} == {q.Q8_0}
    assert {k for n, k in kinds.items() if ".ffn_down." not in n} == {q.Q4_0}
    expected = _source_records(fake)
    for t in reader.tensors:
        if t.name.endswith("ffn_down.weight"):
            i = t.name.split(".")[1]
            want = expected[f"model.layers.{i}.{DOWN}"].dequantize().numpy()
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            assert (got == want).all(), t.name  # Q8_0 holds the symmetric 8-bit grid exactly


def test_formats_that_cannot_hold_the_grids_refuse_before_calibration(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(tmp_path / "float")
    bpe_tokenizer().save_pretrained(tmp_path / "float")
    cases = [("awq", {}, "one grid for the whole model"),
             ("gguf", {"sym": False}, "8 bits and group size 32")]  # ggml has no asymmetric 8-bit block
    for fmt, extra, message in cases:
        opts = QuantizeOptions(output=str(tmp_path / fmt), model=str(tmp_path / "float"), method=Down8.name,
                               bits=4, group_size=32, out_format=fmt, device="cpu", progress=False,
                               calib=str(tmp_path / "missing.txt"), **extra)
        with pytest.raises(TritonqError, match=message):
            quantize(opts)
        assert not (tmp_path / fmt).exists()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def test_packed_mixed_model_runs_like_the_fake_one(fake, tmp_path):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.runtime.qlinear import QuantLinear
    from tritonq.engine.runtime.serve import load_packed_model

    out = save_packed(fake, tmp_path / "ct", "compressed-tensors")
    packed, _ = load_packed_model(out, "cpu", "float32", cpu_int4=False)  # exact fp16 scales
    for name, mod in packed.named_modules():
        if name.endswith(DOWN):
            assert type(mod) is torch.nn.Linear, name  # 8-bit groups: the dense path
        elif name.endswith(("q_proj", "up_proj")):
            assert isinstance(mod, QuantLinear), name
    ref = AutoModelForCausalLM.from_pretrained(fake).eval()
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    diff = (_logits(packed, ids) - _logits(ref, ids)).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    assert _logits(ref, ids).abs().max().item() > 1e-3  # the comparison is not between zeros


def test_cli_eval_and_generate_run_the_packed_mixed_model(fake, tmp_path, capsys):
    out = save_packed(fake, tmp_path / "v2", "gptq_v2")
    text = tmp_path / "heldout.txt"
    text.write_text(pydoc_corpus()[200000:203000], encoding="utf-8")
    assert main(["eval", str(out), "--data", str(text), "--seqlen", "64", "--max-windows", "2",
                 "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out.lower()
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() != ""
