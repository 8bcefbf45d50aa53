"""The model-level hook: ``Method.prepare(model, adapter)`` runs once on the float model before calibration.

A toy method, living only in this file, rotates the residual stream as QuaRot does (Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456; the invariance is SliceGPT's, Ashkboos et
al. 2024, arXiv:2401.15024), through the package's ``engine/rotation.py`` (what ``--rotate`` runs before any
method; ``tests/test_rotation.py`` tests it in full, value heads included): it folds every RMSNorm weight into
the linears the norm feeds (the final norm into ``lm_head``, untying the embeddings first where they are tied),
then multiplies the stream by a random orthogonal ``Q``: embedding rows ``E Q``, reading linears ``W Q``, writing
linears ``Q^T W`` (and biases). It names modules only through the adapter's ``ResidualStream``, then quantizes
round-to-nearest.

* in float64 the rotated model's logits equal the original's to 1e-5 (every Llama-like family, tied too);
* OPT's LayerNorm subtracts the mean, which a rotation does not commute with: refused, the model untouched;
* the adapters' names are right: each ``readers`` norm's output is exactly its linears' input, and so on;
* ``tritonq quantize`` with the toy calls ``prepare`` before capturing the block inputs and saves the
  rotated model, quantized.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from helpers import tiny_config, tiny_tokenizer
from test_pipeline import FAMILIES, make_family_model
from tritonq.engine import pipeline, rotation
from tritonq.engine.adapters import adapter_for
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods import registry
from tritonq.engine.methods.base import LayerResult, Method
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.orthogonal import random_orthogonal
from tritonq.engine.rotation import check_rotatable, rotate_residual
from tritonq.errors import TritonqError

LLAMA_LIKE = [f for f in FAMILIES if f != "opt"]


def toy_rotate(model: nn.Module, adapter, seed: int) -> None:
    """The package's fold and residual rotation (``engine/rotation.py``) by a seeded Haar-random orthogonal ``Q``."""
    n = model.get_submodule(adapter.residual_stream().embedding).weight.shape[1]
    rotate_residual(model, adapter, random_orthogonal(n, torch.Generator().manual_seed(seed)))


@dataclass(frozen=True)
class RotateOptions:
    seed: int = 0


class RotateRTN(Method):
    """Toy: a random rotation of the residual stream before calibration, then round-to-nearest."""

    name = "test-rotate-rtn"
    summary = "test only: residual-stream rotation, then RTN"
    Options = RotateOptions
    events: list[str] = []  # what happened, in order (the end-to-end test reads it)

    def prepare(self, model: nn.Module, adapter) -> None:
        check_rotatable(adapter)
        RotateRTN.events.append("prepare")
        toy_rotate(model, adapter, self.options.seed)

    def quantize(self, group, state) -> list[LayerResult]:
        return [round_to_nearest(lin.weight.data, group.spec, name)
                for lin, name in zip(group.linears, group.full_names)]


@pytest.fixture(autouse=True)
def _registered():
    """The toy method(s) of this file, registered for its tests only (conftest restores the registry)."""
    registry.register(RotateRTN)


def _model(path, family, dtype=torch.float64, seed=0):
    from transformers import AutoModelForCausalLM

    make_family_model(path, family, seed=seed)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _randomize_norms(model, adapter, seed=1):
    """Random-init norms are all ones, which would make the fold a no-op: give them real weights."""
    gen = torch.Generator().manual_seed(seed)
    stream = adapter.residual_stream()
    norms = [block.get_submodule(p.smooth) for block in adapter.block_list(model) for p in stream.readers]
    for norm in [*norms, model.get_submodule(stream.final_norm)]:
        w = 1 + 0.5 * torch.randn(norm.weight.shape, generator=gen, dtype=torch.float64)
        norm.weight.data.copy_(w.to(norm.weight.dtype))


def _ids(vocab=256, n=2, seqlen=48, seed=3):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _check_invariance(model, adapter):
    ids = _ids()
    embed = model.get_submodule(adapter.residual_stream().embedding)
    before_embed = embed.weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    RotateRTN(RotateOptions(seed=5)).prepare(model, adapter)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (embed.weight - before_embed).abs().max() > 0.05  # the stream really moved
    assert before.abs().max() > 0.1
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_rotation_keeps_float64_logits(tmp_path, family):
    model = _model(tmp_path / family, family)
    adapter = adapter_for(model.config)
    _randomize_norms(model, adapter)
    _check_invariance(model, adapter)
    stream = adapter.residual_stream()
    for block in adapter.block_list(model):
        for pair in stream.readers:
            assert torch.equal(block.get_submodule(pair.smooth).weight, torch.ones_like(block.get_submodule(
                pair.smooth).weight))


def test_rotation_unties_embeddings(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).double().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    adapter = adapter_for(model.config)
    _randomize_norms(model, adapter)
    _check_invariance(model, adapter)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


def test_rotation_without_fold_breaks_invariance(tmp_path, monkeypatch):
    """The check above can fail: rotating with the norms left in place changes the logits."""
    model = _model(tmp_path / "llama", "llama")
    adapter = adapter_for(model.config)
    _randomize_norms(model, adapter)
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    monkeypatch.setattr(rotation, "fold_norm", lambda norm, linears: None)
    toy_rotate(model, adapter, seed=5)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-2


def test_opt_layernorm_refused_and_untouched(tmp_path):
    model = _model(tmp_path / "opt", "opt")
    adapter = adapter_for(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TritonqError, match="LayerNorm subtracts the mean"):
        RotateRTN().prepare(model, adapter)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_opt_post_norm_has_no_stream():
    from transformers import OPTConfig

    adapter = adapter_for(OPTConfig(do_layer_norm_before=False))
    with pytest.raises(TritonqError, match="post-norm"):
        adapter.residual_stream()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_names_the_residual_stream(tmp_path, family):
    """Each name resolves to the right kind of module, and each reader norm's output is its linears' input."""
    model = _model(tmp_path / family, family, dtype=torch.float32)
    config, adapter = model.config, adapter_for(model.config)
    stream = adapter.residual_stream()
    hidden = config.hidden_size
    embed = model.get_submodule(stream.embedding)
    assert isinstance(embed, nn.Embedding) and embed.weight.shape == (config.vocab_size, hidden)
    head = model.get_submodule(stream.lm_head)
    assert isinstance(head, nn.Linear) and head.weight.shape == (config.vocab_size, hidden)
    assert model.get_submodule(stream.final_norm).weight.shape == (hidden,)
    if stream.positions is not None:
        assert isinstance(model.get_submodule(stream.positions), nn.Embedding)
    block = adapter.block_list(model)[0]
    for name in stream.writers:
        assert block.get_submodule(name).out_features == hidden
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for pair in stream.readers:
        handles.append(block.get_submodule(pair.smooth).register_forward_hook(
            lambda _m, _a, out, key=pair.smooth: seen.__setitem__(key, out)))
        for name in pair.balance:
            handles.append(block.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, key=name: seen.__setitem__(key, args[0])))
    with torch.no_grad():
        model(input_ids=_ids())
    for h in handles:
        h.remove()
    for pair in stream.readers:
        for name in pair.balance:
            assert torch.equal(seen[name], seen[pair.smooth]), f"{pair.smooth} does not feed {name}"
    readers = {n for p in stream.readers for n in p.balance}
    # the readers are exactly the block's linears whose input is hidden-wide, but o_proj
    hidden_in = {n for n in adapter.linear_names() if block.get_submodule(n).in_features == hidden}
    assert readers == hidden_in - set(adapter.value_pair.balance)  # o_proj reads the heads, not the stream


def _saved_tied_llama(path, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    _randomize_norms(model, adapter_for(model.config))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_quantize_with_the_toy_prepares_before_capture(tmp_path, calib_file, monkeypatch):
    from transformers import AutoModelForCausalLM

    src = _saved_tied_llama(tmp_path / "src")
    capture = pipeline.capture_block_inputs

    def recording_capture(*args, **kwargs):
        RotateRTN.events.append("capture")
        return capture(*args, **kwargs)

    monkeypatch.setattr(pipeline, "capture_block_inputs", recording_capture)
    RotateRTN.events.clear()
    spec = GridSpec(bits=4, group_size=32)
    out = tmp_path / "out"
    quantize(QuantizeOptions(output=str(out), model=str(src), method=RotateRTN.name, bits=4, group_size=32,
                             method_options={"seed": 7}, calib=str(calib_file), nsamples=4, seqlen=64,
                             device="cpu", dtype="float32", progress=False))
    assert RotateRTN.events == ["prepare", "capture"]

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    adapter = adapter_for(reference.config)
    toy_rotate(reference, adapter, seed=7)
    for i, block in enumerate(adapter.block_list(reference)):  # the rotated model, rounded to nearest
        for name in adapter.linear_names():
            lin = block.get_submodule(name)
            lin.weight.data = round_to_nearest(lin.weight.data, spec, name).weight
            torch.testing.assert_close(saved.get_submodule(f"{adapter.blocks}.{i}.{name}").weight, lin.weight,
                                       rtol=0, atol=1e-6)
    assert saved.lm_head.weight is not saved.model.embed_tokens.weight
    torch.testing.assert_close(saved.lm_head.weight, reference.lm_head.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(saved.model.norm.weight, torch.ones_like(saved.model.norm.weight))
    ids = _ids()
    with torch.no_grad():
        want, got = original(input_ids=ids).logits, saved(input_ids=ids).logits
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 0.05  # still the model, 4-bit noise apart


def test_activation_quant_keeps_the_model_hook(tmp_path):
    from tritonq.engine.activations import ActSpec
    from tritonq.engine.methods.act_quant import WithActivationQuant

    model = _model(tmp_path / "llama", "llama")
    adapter = adapter_for(model.config)
    embed = model.get_submodule(adapter.residual_stream().embedding).weight.detach().clone()
    WithActivationQuant(RotateRTN(), ActSpec(bits=8)).prepare(model, adapter)
    assert (model.get_submodule(adapter.residual_stream().embedding).weight - embed).abs().max() > 0.05
