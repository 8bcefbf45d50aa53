"""Packed checkpoint formats: bit-exact round trips, hand-computed layouts, errors, interoperability.

Layouts under test are described in ``engine/formats/`` (one file per layout) and
../shared/docs/formats_and_ecosystem.md §1.
Interop tolerance: the fake-quantized model and every loader compute in float32 from identical weights,
so logits agree to float32 rounding; we require ``max |diff| <= 1e-4`` (observed ~1e-7).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tritonq.engine.formats.bitpack import awq_pack, awq_unpack
from tritonq.engine.formats.checkpoint import read_source, source_layers
from tritonq.engine.formats.registry import PACKED as FORMATS
from tritonq.engine.formats.registry import read_packed, save_packed
from tritonq.engine.formats.runtime import load_packed_layers
from tritonq.errors import TritonqError

from .helpers import make_fake_dir

LOGIT_TOL = 1e-4
PROMPT = [256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]  # <s> "Hello world"

_CACHE: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    """Factory of tiny fake-quantized checkpoints, one per configuration, shared by the module."""

    def make(**kw) -> Path:
        key = tuple(sorted(kw.items()))
        if key not in _CACHE:
            name = "fake-" + "-".join(f"{k}{v}" for k, v in key)
            _CACHE[key] = make_fake_dir(tmp_path_factory.mktemp(name), **kw)
        return _CACHE[key]

    return make


def _source(src: Path) -> dict:
    _, spec, meta = read_source(src)
    return dict(source_layers(src, spec, meta["layers"]))


def _assert_round_trip(src: Path, out: Path) -> None:
    expected = _source(src)
    got = {name: q for name, _, q in read_packed(out)}
    assert set(got) == set(expected)
    for name, q in got.items():
        e = expected[name]
        assert torch.equal(q.codes, e.codes), name
        assert torch.equal(q.scale, e.scale), name
        assert torch.equal(q.zero, e.zero), name
        assert torch.equal(q.g_idx, e.g_idx), name
    # every float tensor of the source (embeddings, norms, lm_head) is carried over unchanged
    src_t = load_file(str(src / "model.safetensors"))
    out_t = load_file(str(out / "model.safetensors"))
    for key, t in src_t.items():
        if key.rpartition(".")[0] not in expected:
            assert torch.equal(out_t[key], t), key


CASES = [
    # (format, bits, group_size, sym, act_order)
    ("compressed-tensors", 4, 32, True, False),
    ("compressed-tensors", 4, 32, False, False),
    ("compressed-tensors", 4, -1, False, False),
    ("compressed-tensors", 4, -1, True, False),
    ("compressed-tensors", 4, 32, False, True),
    ("compressed-tensors", 8, 64, False, False),
    ("compressed-tensors", 3, 32, True, False),
    ("gptq_v2", 4, 32, False, False),
    ("gptq_v2", 4, 32, False, True),
    ("gptq_v2", 4, -1, True, False),
    ("gptq_v2", 2, 64, False, False),
    ("gptq", 4, 32, True, True),
    ("gptq", 4, 64, True, False),
    ("gptq", 8, 32, True, False),
    ("awq", 4, 32, False, False),
    ("awq", 4, 64, True, False),
]


@pytest.mark.parametrize(("fmt", "bits", "group_size", "sym", "act_order"), CASES)
def test_round_trip_is_bit_exact(fake_dir, tmp_path, fmt, bits, group_size, sym, act_order):
    src = fake_dir(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    out = save_packed(src, tmp_path / "packed", fmt)
    _assert_round_trip(src, out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    if fmt.startswith("gptq"):
        assert json.loads((out / "quantize_config.json").read_text()) == qcfg
        assert {"bits", "group_size", "sym", "desc_act"} <= set(qcfg)  # vLLM's Marlin check needs all four
        assert qcfg["checkpoint_format"] == fmt and qcfg["desc_act"] == act_order
    if fmt == "compressed-tensors":
        w = qcfg["config_groups"]["group_0"]["weights"]
        assert w["symmetric"] == sym and w["num_bits"] == bits
        assert w["strategy"] == ("channel" if group_size == -1 else "group")
        assert qcfg["ignore"] == ["lm_head"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_runtime_layout_dequantizes_to_the_fake_weights(fake_dir, tmp_path, fmt):
    from tritonq.kernels.dequant_matmul import dequantize_int4

    src = fake_dir(bits=4, group_size=32, sym=False, act_order=False)
    out = save_packed(src, tmp_path / "p", fmt)
    weights = load_file(str(src / "model.safetensors"))
    for name, p in load_packed_layers(out).items():
        w = dequantize_int4(p.qweight, p.scales, p.zeros, p.group_size, p.g_idx).t()
        assert torch.equal(w, weights[f"{name}.weight"]), name


def test_hand_computed_words():
    # AWQ: nibble i of a word holds column AWQ_ORDER[i] = [0, 2, 4, 6, 1, 3, 5, 7][i], LSB first.
    # Columns 0..7 hold the codes 1..8, so the nibbles (low to high) are 1,3,5,7,2,4,6,8 -> 0x86427531.
    vals = torch.arange(1, 9).reshape(1, 8)
    word = awq_pack(vals)
    assert word.dtype == torch.int32 and word.item() == 0x86427531 - 2**32
    assert torch.equal(awq_unpack(word, 8), vals)
    # GPTQ v1 symmetric 4-bit qzeros: zero 8 stored as 7 in every nibble -> 0x77777777 (formats doc §1.1).
    from tritonq.engine.formats.bitpack import pack_last as _pack_last

    assert _pack_last(torch.full((1, 8), 7), 4).item() == 0x77777777
    # compressed-tensors / GPTQ along K: row j of 8 in nibble j -> codes 1..8 give 0x87654321.
    from tritonq.kernels.pack import pack_int4

    assert pack_int4(vals.reshape(8, 1)).item() == 0x87654321 - 2**32


def test_dense_packing_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from tritonq.engine.formats.bitpack import pack_last as _pack_last
    from tritonq.engine.formats.bitpack import unpack_last as _unpack_last

    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 5, 8):
        vals = torch.randint(0, 2**bits, (5, 64), generator=gen)
        ours = _pack_last(vals, bits)
        theirs = helpers.pack_to_int32((vals - 2 ** (bits - 1)).to(torch.int8), bits)
        assert torch.equal(ours, theirs), bits
        assert torch.equal(_unpack_last(ours, bits, 64), vals)


def _set_zero_point_zero(src: Path) -> None:
    """Move one group of one layer onto a grid whose zero point is 0 (all its weights >= 0)."""
    from tritonq.engine.grid import codes_of

    _, spec, meta = read_source(src)
    name = meta["layers"][0]
    params = load_file(str(src / "quant_params.safetensors"))
    weights = load_file(str(src / "model.safetensors"))
    scale, zero, g_idx = params[f"{name}.scale"], params[f"{name}.zero"], params[f"{name}.g_idx"]
    codes = codes_of(weights[f"{name}.weight"], scale, zero, g_idx, 15).float()
    cols = g_idx == 0
    zero[0, 0] = 0.0
    weights[f"{name}.weight"][0, cols] = scale[0, 0] * codes[0, cols]
    save_file(params, str(src / "quant_params.safetensors"))
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_gptq_v1_refuses_lossy_asymmetric_zero_points(tmp_path):
    src = make_fake_dir(tmp_path / "src", sym=False)
    _set_zero_point_zero(src)
    with pytest.raises(TritonqError, match="gptq_v2, compressed-tensors or awq"):
        save_packed(src, tmp_path / "v1", "gptq")
    assert not (tmp_path / "v1").exists()  # nothing half-written
    _assert_round_trip(src, save_packed(src, tmp_path / "v2", "gptq_v2"))
    _assert_round_trip(src, save_packed(src, tmp_path / "ct", "compressed-tensors"))


def test_format_restrictions(fake_dir, tmp_path):
    with pytest.raises(TritonqError, match="AWQ has no g_idx"):
        save_packed(fake_dir(bits=4, group_size=32, sym=False, act_order=True), tmp_path / "a", "awq")
    with pytest.raises(TritonqError, match="4-bit grouped"):
        save_packed(fake_dir(bits=4, group_size=-1, sym=False, act_order=False), tmp_path / "b", "awq")
    with pytest.raises(TritonqError, match="unknown format"):
        save_packed(fake_dir(bits=4, group_size=32, sym=True, act_order=False), tmp_path / "c", "exl2")
    with pytest.raises(TritonqError, match="2, 4 or 8 bits"):
        save_packed(fake_dir(bits=3, group_size=32, sym=True, act_order=False), tmp_path / "d", "gptq")
    packed = save_packed(fake_dir(bits=4, group_size=32, sym=True, act_order=False), tmp_path / "e", "gptq")
    with pytest.raises(TritonqError, match="already a packed checkpoint"):
        save_packed(packed, tmp_path / "f", "awq")
    with pytest.raises(TritonqError, match="not empty"):
        save_packed(fake_dir(bits=4, group_size=32, sym=True, act_order=False), packed, "gptq")


def _rewrite(out: Path, edit) -> None:
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(out: Path, **changes) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (out / "config.json").write_text(json.dumps(cfg))


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("fmt", "damage", "message"),
    [
        ("gptq_v2", lambda t: t.pop(f"{Q}.qzeros"), "qzeros.*missing"),
        ("gptq_v2", lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:1]}), "groups"),
        ("gptq", lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}), "int32"),
        ("awq", lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:, :1]}), "qzeros must be"),
        ("compressed-tensors", lambda t: t.pop(f"{Q}.weight_scale"), "weight_scale.*missing"),
        ("compressed-tensors", lambda t: t.pop(f"{Q}.weight_zero_point"), "weight_zero_point.*missing"),
        ("compressed-tensors", lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"][:, 1:]}),
         "weight_packed must be"),
        ("compressed-tensors", lambda t: t.update({f"{Q}.weight_shape": torch.tensor([64, 96])}),
         "weight_packed must be"),
    ],
)
def test_malformed_checkpoints_raise_clear_errors(fake_dir, tmp_path, fmt, damage, message):
    out = save_packed(fake_dir(bits=4, group_size=32, sym=False, act_order=False), tmp_path / "p", fmt)
    _rewrite(out, damage)
    with pytest.raises(TritonqError, match=message):
        load_packed_layers(out)


def test_mismatched_configs_raise_clear_errors(fake_dir, tmp_path):
    src = fake_dir(bits=4, group_size=32, sym=False, act_order=False)
    out = save_packed(src, tmp_path / "g", "gptq_v2")
    _edit_config(out, bits=3)
    with pytest.raises(TritonqError, match="3 bits are not supported"):
        load_packed_layers(out)
    _edit_config(out, bits=4, group_size=16)
    with pytest.raises(TritonqError, match="groups"):
        load_packed_layers(out)
    _edit_config(out, quant_method="exl2")
    with pytest.raises(TritonqError, match="not supported"):
        load_packed_layers(out)
    with pytest.raises(TritonqError, match="fake-quantized tritonq output"):
        load_packed_layers(src)
    ct = save_packed(fake_dir(bits=8, group_size=64, sym=False, act_order=False), tmp_path / "c", "compressed-tensors")
    from tritonq.engine.formats.records import DenseLinear  # no int kernel serves 8-bit groups: a dense float layer

    assert all(isinstance(p, DenseLinear) for p in load_packed_layers(ct).values())


# --------------------------------------------------------------------------------------------------
# interoperability


def _logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


def _ct_reference_model(ckpt: Path):
    """Float model whose weights compressed-tensors' own ``PackedQuantizationCompressor`` decompresses.

    An independent reference for asymmetric checkpoints, which transformers cannot load (below).
    """
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt)
    qcfg = config.quantization_config
    qcfg = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    (group,) = qcfg["config_groups"].values()
    scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
    del config.quantization_config
    tensors = load_file(str(ckpt / "model.safetensors"))
    state = {}
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        local = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in ("weight_packed", "weight_scale", "weight_shape",
                                                                    "weight_zero_point") if f"{name}.{leaf}" in tensors}
        state[f"{name}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()
    state.update(tensors)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(state, strict=False)
    return model


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_decompresses_our_export(fake_dir, tmp_path, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = fake_dir(bits=4, group_size=32, sym=sym, act_order=False)
    out = save_packed(src, tmp_path / "ct", "compressed-tensors")
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    diff = (_logits(_ct_reference_model(out)) - _logits(ref)).abs().max().item()
    assert diff <= LOGIT_TOL, diff


@pytest.mark.parametrize(
    "sym",
    [True, pytest.param(False, marks=pytest.mark.xfail(
        raises=RuntimeError, strict=True,
        reason="transformers 5.23 + compressed-tensors 0.20 allocate unpacked [N, G] zero points for packed "
        "[N/8, G] ones; llm-compressor's own asymmetric output fails the same way (llm-compressor#2099)"))],
)
def test_transformers_loads_our_compressed_tensors_export(fake_dir, tmp_path, sym):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = fake_dir(bits=4, group_size=32, sym=sym, act_order=False)
    out = save_packed(src, tmp_path / "ct", "compressed-tensors")
    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    diff = (_logits(theirs) - _logits(ref)).abs().max().item()
    assert diff <= LOGIT_TOL, diff


def _llmcompressor_checkpoint(tmp_path: Path, sym: bool) -> Path:
    """A tiny random Llama quantized by llm-compressor's own QuantizationModifier (W4A16, g32)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import LlamaForCausalLM

    from .helpers import tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    base = tmp_path / "float"
    LlamaForCausalLM(tiny_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    weights = {"num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 32}
    recipe = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                                  ignore=["lm_head"])
    out = tmp_path / "llmc"
    oneshot(model=str(base), recipe=[recipe], output_dir=str(out))
    return out


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None, reason="llmcompressor not installed")
@pytest.mark.parametrize("sym", [True, False])
def test_llmcompressor_checkpoint_loads_into_tritonq(tmp_path, sym):
    from transformers import AutoModelForCausalLM
    from tritonq.engine.runtime.serve import load_packed_model

    ckpt = _llmcompressor_checkpoint(tmp_path, sym)
    ours, _ = load_packed_model(ckpt, "cpu", "float32", cpu_int4=False)  # exact fp16 scales
    diff = (_logits(ours) - _logits(_ct_reference_model(ckpt))).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    if sym:  # transformers cannot load asymmetric packed zero points (see the xfail above)
        theirs = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        diff = (_logits(ours) - _logits(theirs)).abs().max().item()
        assert diff <= LOGIT_TOL, diff
    layers = {name: q for name, _, q in read_packed(ckpt)}
    assert len(layers) == 14 and all(int(q.codes.max()) <= 15 for q in layers.values())


def _compressed_tensors_checkpoint(path: Path, sym: bool) -> Path:
    """A checkpoint written the way llm-compressor saves one, with the compressed-tensors API only.

    llm-compressor's ``save_pretrained`` wrapper calls ``ModelCompressor.from_pretrained_model``,
    ``compress_model``, the model's own ``save_pretrained`` and ``update_config``
    (``llmcompressor/transformers/compression/compressed_tensors_utils.py``); the weights get
    compressed-tensors' min-max ``calculate_qparams``, as ``QuantizationModifier`` would give them.
    Runs in CI, where llmcompressor (which pins an older transformers) is not installed.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaForCausalLM

    from .helpers import tiny_config, tiny_tokenizer

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config())
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        n, k = module.weight.shape
        w = module.weight.data.reshape(n, k // 32, 32)
        scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        if not sym:
            module.weight_zero_point.data = zp.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_written_checkpoint_loads_into_tritonq(tmp_path, sym):
    pytest.importorskip("compressed_tensors")
    from tritonq.engine.runtime.serve import load_packed_model

    ckpt = _compressed_tensors_checkpoint(tmp_path / "ct", sym)
    ours, _ = load_packed_model(ckpt, "cpu", "float32", cpu_int4=False)  # exact fp16 scales
    diff = (_logits(ours) - _logits(_ct_reference_model(ckpt))).abs().max().item()
    assert diff <= LOGIT_TOL, diff


def test_bfloat16_model_keeps_exact_fp16_scales(tmp_path):
    """bf16 cannot hold every fp16 scale: CT export then stores float16 scales and says so (scale_dtype)."""
    src = make_fake_dir(tmp_path / "src", sym=True)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    out = save_packed(src, tmp_path / "ct", "compressed-tensors")
    weights = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert weights["weights"]["scale_dtype"] == "torch.float16"
    assert load_file(str(out / "model.safetensors"))[f"{Q}.weight_scale"].dtype == torch.float16
    _assert_round_trip(src, out)


# --------------------------------------------------------------------------------------------------
# the registry: every format class on fresh random grids, the library's own output, refused tampering


def _random_record(n: int, k: int, spec, gen: torch.Generator, act_order: bool, min_zero: int = 0):
    """A record drawn at random (codes, zero points, fp16-valued scales, g_idx), not derived from weights."""
    from tritonq.engine.formats.records import QuantizedWeight

    g = spec.effective_group(k)
    groups = k // g
    codes = torch.randint(0, spec.maxq + 1, (n, k), generator=gen).to(torch.uint8)
    if spec.sym:
        zero = torch.full((n, groups), float(2 ** (spec.bits - 1)))
    else:
        zero = torch.randint(min_zero, spec.maxq + 1, (n, groups), generator=gen).float()
    scale = (torch.rand(n, groups, generator=gen) * 0.05 + 2**-10).half().float()
    order = torch.randperm(k, generator=gen) if act_order else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // g).to(torch.int32)
    return QuantizedWeight(codes, scale, zero, g_idx)


def _write_checkpoint(path: Path, fmt: str, records: dict, spec, model_dtype=torch.float32) -> Path:
    """Only the packed tensors and config of ``FORMATS[fmt]``: enough for ``read_packed``."""
    packer = FORMATS[fmt]
    tensors = {}
    for name, q in records.items():
        tensors.update(packer.pack_layer(name, q, spec, model_dtype))
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    qcfg = packer.config(dict.fromkeys(records, spec), model_dtype=model_dtype, ignore=["lm_head"],
                         act_order=False, desc_act=False, version="test")
    (path / "config.json").write_text(json.dumps({"quantization_config": qcfg}))
    return path


REGISTRY_CASES = [
    # (format, bits, group_size, sym, act_order, N, K)
    ("compressed-tensors", 4, 32, False, False, 64, 128),
    ("compressed-tensors", 4, -1, True, False, 64, 128),
    ("compressed-tensors", 3, 32, False, False, 24, 96),  # words split elements; zero points too
    ("compressed-tensors", 8, 16, True, False, 40, 48),
    ("compressed-tensors", 4, 32, False, True, 64, 128),
    ("gptq", 4, 32, True, True, 64, 128),
    ("gptq", 8, -1, True, False, 32, 64),
    ("gptq_v2", 2, 32, False, True, 64, 128),
    ("gptq_v2", 4, 64, False, False, 48, 128),
    ("awq", 4, 32, False, False, 64, 128),
    ("awq", 4, 128, True, False, 32, 256),
]


def test_registry_holds_one_class_per_format():
    from tritonq.engine.formats.base import OutputFormat, PackedFormat
    from tritonq.engine.formats.registry import DEFAULT_FORMAT
    from tritonq.engine.formats.registry import FORMATS as ALL

    assert list(ALL) == ["fake", "compressed-tensors", "gptq", "gptq_v2", "awq", "gguf"] and DEFAULT_FORMAT in ALL
    assert list(FORMATS) == ["compressed-tensors", "gptq", "gptq_v2", "awq"]  # the packed ones tritonq reads back
    for name, fmt in ALL.items():
        assert isinstance(fmt, OutputFormat) and fmt.name == name
        assert isinstance(fmt, PackedFormat) == (name in FORMATS)
    assert len({type(f) for f in ALL.values()}) == len(ALL)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("fmt", "bits", "group_size", "sym", "act_order", "n", "k"), REGISTRY_CASES)
def test_each_format_class_round_trips_random_grids(tmp_path, fmt, bits, group_size, sym, act_order, n, k, seed):
    from tritonq.engine.formats.registry import checkpoint_format
    from tritonq.engine.grid import GridSpec

    spec = GridSpec(bits=bits, group_size=group_size, sym=sym)
    FORMATS[fmt].check_grid(spec)
    gen = torch.Generator().manual_seed(seed)
    min_zero = 1 if fmt == "gptq" else 0  # v1 stores z - 1 (the refusal of z = 0 is tested above)
    records = {f"layer{i}.proj": _random_record(n, k, spec, gen, act_order, min_zero) for i in range(2)}
    out = _write_checkpoint(tmp_path / "ckpt", fmt, records, spec)
    assert checkpoint_format(out) == fmt
    got = {name: (s, q) for name, s, q in read_packed(out)}
    assert set(got) == set(records)
    for name, q in records.items():
        s, back = got[name]
        assert (s.bits, s.group_size) == (bits, group_size), name
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(back, field), getattr(q, field)), (name, field)


def _library_checkpoint(src: Path, path: Path, sym: bool, group_size: int) -> Path:
    """``src``'s grid written by compressed-tensors itself, the way llm-compressor saves (see below)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group_size)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    params = load_file(str(src / "quant_params.safetensors"))
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        module.weight_scale.data = params[f"{name}.scale"].to(module.weight_scale.dtype)
        if not sym:  # compressed-tensors keeps signed zero points z - 2^(b-1)
            module.weight_zero_point.data = (params[f"{name}.zero"] - 8).to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return path


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_export_equals_the_librarys_own(fake_dir, tmp_path, sym):
    pytest.importorskip("compressed_tensors")
    src = fake_dir(bits=4, group_size=32, sym=sym, act_order=False)
    ours = save_packed(src, tmp_path / "ours", "compressed-tensors")
    theirs = _library_checkpoint(src, tmp_path / "theirs", sym, 32)
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert qa == qb


def _nudge(src: Path, file: str, key: str, dtype: torch.dtype) -> None:
    """Move one value of one tensor to the next ``dtype`` value up: the smallest possible modification."""
    tensors = load_file(str(src / file))
    t = tensors[key]
    v = t.view(-1)[5].to(dtype)
    t.view(-1)[5] = torch.nextafter(v, torch.tensor(float("inf"), dtype=dtype)).to(t.dtype)
    save_file(tensors, str(src / file), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("dtype", "file"),
    [
        (torch.float32, "model.safetensors"),
        (torch.bfloat16, "model.safetensors"),
        # one fp16 step of a scale (still a valid fp16 scale): the fp32 weights no longer match the grid.
        # Not for bf16 weights: their rounding may absorb so small a change, and then the packed grid still
        # reproduces every stored weight bit for bit, which is all that packing promises.
        (torch.float32, "quant_params.safetensors"),
    ],
)
def test_tampered_directories_are_refused(tmp_path, dtype, file):
    src = make_fake_dir(tmp_path / "src", sym=False)
    if dtype == torch.bfloat16:
        tensors = load_file(str(src / "model.safetensors"))
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(src / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert save_packed(src, tmp_path / "ok", "gptq_v2").is_dir()  # untouched: packs
    if file == "model.safetensors":
        _nudge(src, file, f"{Q}.weight", dtype)
    else:
        _nudge(src, file, f"{Q}.scale", torch.float16)
    for fmt in FORMATS:
        with pytest.raises(TritonqError, match=rf"{Q}: .* not points of the grid .* modified"):
            save_packed(src, tmp_path / fmt, fmt)
        assert not (tmp_path / fmt).exists()


def test_records_in_memory_pack_like_the_directory(fake_dir, tmp_path):
    src = fake_dir(bits=4, group_size=32, sym=False, act_order=True)
    records = _source(src)
    for fmt in ("compressed-tensors", "gptq_v2"):
        a = load_file(str(save_packed(src, tmp_path / f"dir-{fmt}", fmt) / "model.safetensors"))
        b = load_file(str(save_packed(src, tmp_path / f"mem-{fmt}", fmt, layers=records) / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fmt
    with pytest.raises(TritonqError, match="name different layers"):
        save_packed(src, tmp_path / "bad", "gptq_v2", layers=dict(list(records.items())[1:]))


def test_writers_refuse_scales_their_dtype_cannot_hold():
    from tritonq.engine.grid import GridSpec

    spec = GridSpec(bits=4, group_size=32, sym=True)
    q = _random_record(16, 64, spec, torch.Generator().manual_seed(0), act_order=False)
    q.scale[0, 0] = 1 / 3  # not an fp16 value
    for fmt in ("gptq", "awq"):
        with pytest.raises(TritonqError, match="not representable in float16"):
            FORMATS[fmt].pack_layer("x", q, spec, torch.float32)
    with pytest.raises(TritonqError, match="not representable in float16"):
        FORMATS["compressed-tensors"].pack_layer("x", q, spec, torch.bfloat16)  # bf16 models keep fp16 scales
    assert FORMATS["compressed-tensors"].pack_layer("x", q, spec, torch.float32)["x.weight_scale"][0, 0] == 1 / 3


def test_missing_compressed_tensors_names_the_install(monkeypatch):
    from tritonq.engine.formats import ct_library as formats
    from tritonq.engine.grid import GridSpec

    monkeypatch.setitem(__import__("sys").modules, "compressed_tensors", None)  # makes the import fail
    formats.compressed_tensors_lib.cache_clear()  # forget the library found by earlier tests
    try:
        with pytest.raises(TritonqError, match="pip install"):
            FORMATS["compressed-tensors"].check_grid(GridSpec())
    finally:
        formats.compressed_tensors_lib.cache_clear()


def test_pack_command_prints_what_it_wrote(fake_dir, tmp_path, capsys):
    import argparse

    from tritonq.commands import pack

    src = fake_dir(bits=4, group_size=32, sym=True, act_order=False)
    args = argparse.Namespace(src=str(src), output=str(tmp_path / "out"), out_format="gptq", overwrite=False)
    assert pack(args) == 0
    assert capsys.readouterr().out.startswith(f"wrote gptq checkpoint to {tmp_path / 'out'} (")
