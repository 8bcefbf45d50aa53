"""The online Hadamard in a compressed-tensors checkpoint (``engine/formats/ct_transform.py``, issue 24 item 2).

* a rotated W4A8 tiny Llama (symmetric: transformers 5.2x with compressed-tensors 0.20 loads no asymmetric
  ``pack-quantized`` checkpoint) packed as compressed-tensors carries a ``transform_config`` the library parses and
  the matrix under the name its transform modules load;
* loaded the way the readers do it (transformers' compressed-tensors loader for the weights and the dynamic 8-bit
  activations, then compressed-tensors' ``apply_transform_config`` with the config's online entries, as vLLM takes
  them, and the stored matrix loaded into the modules it created), the logits equal tritonq's packed model's;
  compressed-tensors' own ``random-hadamard`` draw is another matrix (the stored one must be loaded);
* negative controls: the same load without the transform, or with the matrix without its random signs, is far off;
* tritonq refuses a checkpoint whose stored matrix is not its record's, or whose transform_config it did not write.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pipeline import make_family_model
from tritonq.engine.formats.ct_transform import GROUP, ct_matrix, matrix_key
from tritonq.engine.online_hadamard import OnlineHadamard
from tritonq.errors import TritonqError

ct_transform = pytest.importorskip("compressed_tensors.transform")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """W4A8 (per-token dynamic 8-bit) GPTQ, symmetric g32, ``--rotate hadamard``, packed as compressed-tensors."""
    from tritonq.engine.api import QuantizeOptions, quantize
    from tritonq.engine.data import pydoc_corpus

    root = tmp_path_factory.mktemp("ct_transform")
    calib = root / "calib.txt"
    calib.write_text(pydoc_corpus()[:20000], encoding="utf-8")
    src = make_family_model(root / "src", "llama", seed=5)
    quantize(QuantizeOptions(model=str(src), output=str(root / "ct"), out_format="compressed-tensors", method="gptq",
                             bits=4, group_size=32, sym=True, act_bits=8, rotate="hadamard", rotate_seed=7,
                             calib=str(calib), nsamples=8, seqlen=64, device="cpu", dtype="float32", progress=False))
    return root / "ct"


def _config(path):
    return json.loads((path / "config.json").read_text())


def _stored(path, key):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_tensor(key) if key in f.keys() else None


def _ct_model(path, matrix):
    """The checkpoint loaded by transformers + compressed-tensors, the config's online transforms applied by
    compressed-tensors (vLLM skips the ``weight_*`` entries: the weights hold them), ``matrix`` (None: no
    transform) loaded into the transform module it created."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    if matrix is None:
        return model, None
    tcfg = ct_transform.TransformConfig.model_validate(_config(path)["quantization_config"]["transform_config"])
    for scheme in tcfg.config_groups.values():
        scheme.apply = [args for args in scheme.apply if args.is_online()]
    ct_transform.apply_transform_config(model, tcfg)
    generated = model.model.layers[0].mlp.down_proj.get_submodule(f"{GROUP}_input").weight.detach().clone()
    result = model.load_state_dict({matrix_key(_config(path)): matrix}, strict=False)
    assert not result.unexpected_keys
    return model, generated


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 48))


@pytest.fixture(scope="module")
def tritonq_logits(packed, ids):
    from tritonq.engine.api import load_evaluation_model

    model = load_evaluation_model(str(packed), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


def test_config_and_matrix_are_what_the_readers_expect(packed):
    config = _config(packed)
    record = config["tritonq_online_hadamard"]
    tcfg = ct_transform.TransformConfig.model_validate(config["quantization_config"]["transform_config"])
    (scheme,) = tcfg.config_groups.values()
    assert scheme.type == "random-hadamard" and not scheme.randomize and scheme.head_dim is None
    assert [(a.location, a.inverse) for a in scheme.apply] == [("input", False), ("weight_input", True)]
    key = matrix_key(config)
    assert key == "model.layers.0.mlp.down_proj.R4_input.weight"
    stored = _stored(packed, key)
    assert stored.dtype == torch.float32 and stored.shape == (record["size"], record["size"])
    assert bool(stored.abs().eq(1).all())  # a Hadamard construction: exactly +-1
    n = record["size"]
    x = torch.randn(5, n, dtype=torch.float64)
    t = OnlineHadamard.build(n, record["seed"])
    torch.testing.assert_close(x @ stored.double() / math.sqrt(n), t(x), rtol=0, atol=1e-12)  # readers: x M / sqrt(n)
    assert _stored(packed, "model.layers.1.mlp.down_proj.R4_input.weight") is None  # once, tied as llm-compressor


def test_compressed_tensors_load_gives_tritonq_logits(packed, ids, tritonq_logits):
    key = matrix_key(_config(packed))
    model, generated = _ct_model(packed, _stored(packed, key))
    assert not torch.equal(generated, _stored(packed, key))  # its own random-hadamard draw: another matrix
    module = model.model.layers[1].mlp.down_proj.get_submodule(f"{GROUP}_input")
    assert module.weight is model.model.layers[0].mlp.down_proj.get_submodule(f"{GROUP}_input").weight  # shared
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert tritonq_logits.abs().max() > 0.1
    # per-token 8-bit activations: compressed-tensors' scale is absmax / 127.5, tritonq's absmax / 127
    assert _rel(got, tritonq_logits) < 1e-3


@pytest.mark.parametrize("control", ["dropped", "no signs"])
def test_controls_are_far_off(packed, ids, tritonq_logits, control):
    config = _config(packed)
    stored = _stored(packed, matrix_key(config))
    if control == "dropped":
        model, _ = _ct_model(packed, None)
    else:  # M = diag(s) H^T: the rows' signs removed
        signs = OnlineHadamard.build(stored.shape[0], config["tritonq_online_hadamard"]["seed"]).signs.float()
        model, _ = _ct_model(packed, signs[:, None] * stored)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert _rel(got, tritonq_logits) > 1e-2


def test_tritonq_refuses_a_stored_matrix_it_did_not_record(packed, tmp_path):
    import shutil

    from tritonq.engine.formats.registry import read_packed

    copy = tmp_path / "ct"
    shutil.copytree(packed, copy)
    key = matrix_key(_config(copy))
    tensors = load_file(str(copy / "model.safetensors"))
    tensors[key] = -tensors[key].flip(0)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TritonqError, match="is not the transform tritonq_online_hadamard records"):
        list(read_packed(copy))
    config = _config(copy)
    del config["tritonq_online_hadamard"]
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "quantization.json").unlink()
    with pytest.raises(TritonqError, match="tritonq does not run other transforms"):
        list(read_packed(copy))


def test_matrix_of_a_paley_width_is_exact():
    """1536 (SmolLM2: Paley I 12 x Sylvester 128): +-1 after the float64 round-off, equal to sqrt(n) T^T."""
    record = OnlineHadamard.build(1536, 0).describe()
    m = ct_matrix(record, "test")
    assert bool(m.abs().eq(1).all())
    t = OnlineHadamard.build(1536, 0).matrix()
    torch.testing.assert_close(m.double(), t.T * math.sqrt(1536), rtol=0, atol=1e-9)


def test_down_proj_bias_is_warned_and_no_record_writes_nothing():
    """vLLM's transform method asserts that the linear has no bias: a Llama with ``mlp_bias`` is warned about."""
    from tritonq.engine.formats.ct_transform import transform_config, transform_tensors

    config = {"model_type": "llama", "mlp_bias": True}
    record = OnlineHadamard.build(64, 2).describe()
    with pytest.warns(UserWarning, match="vLLM refuses online transforms on linears with a bias"):
        tensors = transform_tensors(config, record, "test")
    assert list(tensors) == ["model.layers.0.mlp.down_proj.R4_input.weight"]
    assert transform_config(config, None) == {} and transform_tensors(config, None, "test") == {}
