"""Whole-block groups: a method with ``scope = "block"`` gets a decoder block at once (``groups.BlockGroup``).

A toy living only in this file tunes every linear's rounding against the block's output, as AutoRound does
(Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of LLMs",
arXiv:2309.05516): a learnable offset ``V`` in [-0.5, 0.5] per weight, ``w_q = s (clamp(round(w / s + V) + z)
- z)`` with a straight-through estimator for the rounding, and signed gradient steps on the block output's MSE
against the float block. It starts from round-to-nearest (``V = 0``) and keeps the best ``V`` it saw.

* on a tiny model its block output error is below RTN's, and the offsets moved (gradients flowed);
* the pipeline hands each block the chunks entering it (the quantized blocks before it upstream) and the
  float block's outputs on them, writes the results in ``linear_names()`` order, and propagates the
  quantized block's outputs; autograd is on only when the method ``needs_grad``, and the model's own
  parameters come back with ``requires_grad`` as they were and no gradients;
* a block method runs end to end through ``quantize`` and saves; bad declarations fail with a clear error.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from test_pipeline import make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.data import pydoc_corpus
from tritonq.engine.grid import GridSpec, default_g_idx, fit_groups, quantize_codes
from tritonq.engine.methods import registry
from tritonq.engine.methods.base import LayerResult, Method, NoOptions
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.pipeline import capture_block_inputs, quantize_blocks
from tritonq.errors import TritonqError

SPEC = GridSpec(bits=3, group_size=32)
CPU = torch.device("cpu")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _fake(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, v: torch.Tensor, maxq: int) -> torch.Tensor:
    return s * (torch.clamp(_round_ste(w / s + v) + z, 0, maxq) - z)


@dataclass(frozen=True)
class SignRoundOptions:
    steps: int = 30
    lr: float = 0.01


class SignRound(Method):
    """Toy: signed gradient descent on each weight's rounding offset, against the float block's output."""

    name = "test-signround"
    summary = "test only: AutoRound-like rounding offsets, tuned per block"
    Options = SignRoundOptions
    scope = "block"
    needs_grad = True
    grad_enabled: list[bool] = []

    def quantize_block(self, block) -> list[LayerResult]:
        SignRound.grad_enabled.append(torch.is_grad_enabled())
        grids, offsets = [], []
        for lin, spec, name in zip(block.linears, block.specs, block.full_names):
            w = lin.weight.detach().float()
            scale, zero = fit_groups(w, spec, name)
            g_idx = default_g_idx(w.shape[1], spec)
            grids.append((w, scale, zero, g_idx, spec.maxq))
            offsets.append(torch.zeros_like(w, requires_grad=True))

        def weights():
            return {name: _fake(w, s[:, g.long()], z[:, g.long()], v, maxq)
                    for name, (w, s, z, g, maxq), v in zip(block.names, grids, offsets)}

        def loss_and_grads():
            total = 0.0
            grads = [torch.zeros_like(v) for v in offsets]
            for c in range(len(block.inputs)):
                loss = (block.run(c, weights()) - block.targets[c].to(block.device)).pow(2).mean()
                for acc, g in zip(grads, torch.autograd.grad(loss, offsets)):
                    acc += g
                total += float(loss.detach()) / len(block.inputs)
            return total, grads

        best, best_v = float("inf"), None
        for step in range(self.options.steps + 1):
            loss, grads = loss_and_grads()
            if loss < best:
                best, best_v = loss, [v.detach().clone() for v in offsets]
            if step == self.options.steps:
                break
            lr = self.options.lr * (1 - step / self.options.steps)  # linear decay, as AutoRound
            with torch.no_grad():
                for v, g in zip(offsets, grads):
                    v.sub_(lr * g.sign()).clamp_(-0.5, 0.5)
        results = []
        for (w, s, z, g, maxq), v in zip(grids, best_v):
            with torch.no_grad():
                q = _fake(w, s[:, g.long()], z[:, g.long()], v, maxq)
            results.append(LayerResult(q, s, z, g, {"loss": best, "moved": float((v != 0).float().mean())}))
        return results


class BlockProbe(Method):
    """Toy: records what each block call receives; round-to-nearest per linear, no gradients."""

    name = "test-block-probe"
    Options = NoOptions
    scope = "block"
    seen: list[dict] = []

    def quantize_block(self, block) -> list[LayerResult]:
        BlockProbe.seen.append({"index": block.index, "names": block.names, "grad": torch.is_grad_enabled(),
                                "inputs": [c.hidden.clone() for c in block.inputs],
                                "targets": [t.clone() for t in block.targets]})
        return [round_to_nearest(lin.weight.data, spec, name)
                for lin, spec, name in zip(block.linears, block.specs, block.full_names)]


@pytest.fixture(autouse=True)
def _registered():
    """The toy method(s) of this file, registered for its tests only (conftest restores the registry)."""
    registry.register(SignRound)
    registry.register(BlockProbe)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _batches(n=6, seqlen=64, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return list(torch.split(torch.randint(0, 256, (n, seqlen), generator=gen), batch))


def _block_error(model, adapter, chunks, targets, index=0):
    """Mean squared error of block ``index``'s output against ``targets`` on ``chunks``."""
    block = adapter.block_list(model)[index]
    with torch.no_grad():
        return sum(float((_out(block, c) - t).pow(2).mean()) for c, t in zip(chunks, targets)) / len(chunks)


def _out(block, chunk):
    out = block(chunk.hidden, **chunk.kwargs)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return make_family_model(tmp_path_factory.mktemp("float") / "llama", "llama")


def test_signround_beats_rtn_on_the_block_output(float_dir):
    reference = _load(float_dir)
    adapter = adapter_for(reference.config)
    data = {}  # block 0's inputs and float outputs on the calibration windows and on held-out ones
    for split, seed in (("calibration", 0), ("held-out", 9)):
        chunks = capture_block_inputs(reference, adapter, _batches(seed=seed), CPU)
        with torch.no_grad():
            data[split] = chunks, [_out(adapter.block_list(reference)[0], c) for c in chunks]
    errors = {}
    for method in ("rtn", SignRound.name):
        model = _load(float_dir)
        SignRound.grad_enabled.clear()
        report = quantize_blocks(model, adapter, registry.make_method(method), SPEC, CPU, _batches(), progress=False)
        for split, (chunks, targets) in data.items():
            errors[split, method] = _block_error(model, adapter, chunks, targets)
        if method == SignRound.name:
            assert SignRound.grad_enabled == [True, True]
            moved = {n: r.info["moved"] for n, r in report.layers.items()}
            assert len(moved) == 14 and min(moved.values()) > 0.01, moved  # gradients reached every linear
            assert all(p.grad is None and p.requires_grad for p in model.parameters())
            for name, res in report.layers.items():  # the weights lie on the returned grid
                w = model.get_submodule(name).weight.data
                idx = res.g_idx.long()
                q = quantize_codes(w, res.scale[:, idx], res.zero[:, idx], SPEC.maxq)
                torch.testing.assert_close(w, res.scale[:, idx] * (q - res.zero[:, idx]), rtol=0, atol=1e-6)
    power = sum(float(t.pow(2).mean()) for t in data["calibration"][1]) / len(data["calibration"][1])
    assert errors["calibration", "rtn"] > 1e-3 * power  # RTN really errs
    assert errors["calibration", SignRound.name] < 0.6 * errors["calibration", "rtn"], errors
    assert errors["held-out", SignRound.name] < 0.95 * errors["held-out", "rtn"], errors


def test_pipeline_hands_inputs_targets_and_propagates_the_quantized_block(float_dir):
    original, model = _load(float_dir), _load(float_dir)
    adapter = adapter_for(model.config)
    BlockProbe.seen.clear()
    report = quantize_blocks(model, adapter, BlockProbe(), SPEC, CPU, _batches(), progress=False)
    assert [s["index"] for s in BlockProbe.seen] == [0, 1]
    assert all(s["names"] == tuple(adapter.linear_names()) and not s["grad"] for s in BlockProbe.seen)
    first, second = BlockProbe.seen
    entering = capture_block_inputs(original, adapter, _batches(), CPU)
    quantized_0, float_0 = adapter.block_list(model)[0], adapter.block_list(original)[0]
    float_1 = adapter.block_list(original)[1]
    with torch.no_grad():
        for c, chunk in enumerate(entering):
            assert torch.equal(first["inputs"][c], chunk.hidden)
            torch.testing.assert_close(first["targets"][c], _out(float_0, chunk), rtol=0, atol=1e-6)
            chunk.hidden = _out(quantized_0, chunk)  # what the quantized block 0 hands on
            torch.testing.assert_close(second["inputs"][c], chunk.hidden, rtol=0, atol=1e-6)
            torch.testing.assert_close(second["targets"][c], _out(float_1, chunk), rtol=0, atol=1e-6)
    originals = dict(original.named_modules())
    assert len(report.layers) == 2 * len(adapter.linear_names())
    for name, res in report.layers.items():  # each result went into its own linear
        want = round_to_nearest(originals[name].weight.data, SPEC, name)
        assert torch.equal(model.get_submodule(name).weight.data, want.weight), name
        assert torch.equal(res.scale, want.scale) and res.spec == SPEC


def test_propagated_inputs_are_the_quantized_ones(float_dir):
    """Block 1 sees block 0's quantized output, not its float output (the check above could not tell)."""
    original = _load(float_dir)
    adapter = adapter_for(original.config)
    BlockProbe.seen.clear()
    quantize_blocks(_load(float_dir), adapter, BlockProbe(), SPEC, CPU, _batches(), progress=False)
    entering = capture_block_inputs(original, adapter, _batches(), CPU)
    with torch.no_grad():
        float_next = _out(adapter.block_list(original)[0], entering[0])
    assert (BlockProbe.seen[1]["inputs"][0] - float_next).abs().max() > 1e-4


class WrongCount(BlockProbe):
    name = "test-block-wrong-count"

    def quantize_block(self, block):
        return super().quantize_block(block)[:-1]


class NoBlockMethod(Method):
    name = "test-block-missing"
    scope = "block"


class BadScope(Method):
    name = "test-bad-scope"
    scope = "model"


@pytest.mark.parametrize(("method", "message"), [
    (WrongCount(), "returned 6 results for the 7 linears of block 0"),
    (NoBlockMethod(), "does not define quantize_block"),
    (BadScope(), "scope is 'group'"),
])
def test_bad_block_methods_fail_clearly(float_dir, method, message):
    model = _load(float_dir)
    with pytest.raises(TritonqError, match=message):
        quantize_blocks(model, adapter_for(model.config), method, SPEC, CPU, _batches(), progress=False)


def test_quantize_end_to_end_with_a_block_method(tmp_path, float_dir):
    from safetensors.torch import load_file

    calib = tmp_path / "calib.txt"
    calib.write_text(pydoc_corpus()[:20000], encoding="utf-8")
    out = tmp_path / "out"
    quantize(QuantizeOptions(output=str(out), model=str(float_dir), method=SignRound.name, bits=3, group_size=32,
                             method_options={"steps": 3}, calib=str(calib), nsamples=4, seqlen=64, device="cpu",
                             dtype="float32", progress=False))
    saved = _load(out)
    params = load_file(out / "quant_params.safetensors")
    adapter = adapter_for(saved.config)
    for i in range(2):
        for leaf in adapter.linear_names():
            name = f"{adapter.blocks}.{i}.{leaf}"
            w = saved.get_submodule(name).weight.data
            idx = params[f"{name}.g_idx"].long()
            scale, zero = params[f"{name}.scale"][:, idx], params[f"{name}.zero"][:, idx]
            torch.testing.assert_close(w, scale * (quantize_codes(w, scale, zero, SPEC.maxq) - zero), rtol=0,
                                       atol=1e-6)
    assert isinstance(saved.get_submodule("model.layers.0.mlp.down_proj"), nn.Linear)


def test_activation_quant_keeps_the_block_scope(float_dir):
    """Under --act-bits the wrapper still hands whole blocks over, and block 1 sees block 0 run on quantized
    activations (4-bit inputs move its output)."""
    from tritonq.engine.activations import ActSpec
    from tritonq.engine.methods.act_quant import WithActivationQuant

    adapter = adapter_for(_load(float_dir).config)
    entering = {}
    for label, method in (("weights", BlockProbe()), ("acts", WithActivationQuant(BlockProbe(), ActSpec(bits=4)))):
        BlockProbe.seen.clear()
        quantize_blocks(_load(float_dir), adapter, method, SPEC, CPU, _batches(), progress=False)
        assert [s["index"] for s in BlockProbe.seen] == [0, 1]
        entering[label] = BlockProbe.seen[1]["inputs"][0]
    assert (entering["acts"] - entering["weights"]).abs().max() > 1e-4
