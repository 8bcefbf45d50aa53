"""AutoRound (``engine/methods/autoround.py``): signed gradient descent on rounding offsets and group ranges.

* on a tiny Llama its block-output error is well below RTN's on the calibration windows and below it on held-out
  windows, and the weights lie on the grids it returns;
* zero steps is round-to-nearest bit for bit (the first scored step is ``V = 0`` with factors 1);
* ``--init gptq`` starts from GPTQ's codes wherever they are within half a step of the weight;
* the result packs into compressed-tensors and GPTQ exactly (codes, scales, zeros as the fake output);
* bad options and ``--mse`` fail with one line;
* ``--trim``'s loss equals a float64 reference, gives the left-out errors no gradient, and changes the run.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_block_scope import BlockProbe, _batches, _block_error, _load, _out
from test_pipeline import make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.api import QuantizeOptions, quantize
from tritonq.engine.formats.checkpoint import read_source, source_layers
from tritonq.engine.formats.registry import read_packed, save_packed
from tritonq.engine.grid import GridSpec, fit_groups, quantize_codes
from tritonq.engine.groups import Chunk
from tritonq.engine.hessian import HessianAccumulator
from tritonq.engine.methods import registry
from tritonq.engine.methods.autoround import AutoRound, AutoRoundOptions
from tritonq.engine.methods.gptq import GPTQOptions
from tritonq.engine.methods.gptq import solve as gptq_solve
from tritonq.engine.pipeline import capture_block_inputs, quantize_blocks
from tritonq.errors import TritonqError

SPEC = GridSpec(bits=3, group_size=32)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return make_family_model(tmp_path_factory.mktemp("float") / "llama", "llama")


def _run(float_dir, method, spec=SPEC):
    model = _load(float_dir)
    adapter = adapter_for(model.config)
    return model, adapter, quantize_blocks(model, adapter, method, spec, CPU, _batches(), progress=False)


def test_autoround_beats_rtn_on_the_block_output(float_dir):
    reference = _load(float_dir)
    adapter = adapter_for(reference.config)
    data = {}
    for split, seed in (("calibration", 0), ("held-out", 9)):
        chunks = capture_block_inputs(reference, adapter, _batches(seed=seed), CPU)
        with torch.no_grad():
            data[split] = chunks, [_out(adapter.block_list(reference)[0], c) for c in chunks]
    errors = {}
    for name, method in (("rtn", registry.make_method("rtn")), ("autoround", AutoRound(AutoRoundOptions(iters=60)))):
        model, adapter, report = _run(float_dir, method)
        for split, (chunks, targets) in data.items():
            errors[split, name] = _block_error(model, adapter, chunks, targets)
        if name == "autoround":
            assert all(p.grad is None and p.requires_grad for p in model.parameters())
            for lname, res in report.layers.items():  # the weights lie on the returned grids
                w = model.get_submodule(lname).weight.data
                idx = res.g_idx.long()
                q = quantize_codes(w, res.scale[:, idx], res.zero[:, idx], SPEC.maxq)
                assert torch.equal(w, res.scale[:, idx] * (q - res.zero[:, idx])), lname
                assert res.info["loss"] <= res.info["loss_first_step"]
            assert max(r.info["best_step"] for r in report.layers.values()) > 0  # the steps improved on RTN
    power = sum(float(t.pow(2).mean()) for t in data["calibration"][1]) / len(data["calibration"][1])
    assert errors["calibration", "rtn"] > 1e-3 * power, (errors, power)  # RTN really errs
    assert errors["calibration", "autoround"] < 0.8 * errors["calibration", "rtn"], errors
    assert errors["held-out", "autoround"] < errors["held-out", "rtn"], errors


def test_zero_steps_is_round_to_nearest(float_dir):
    rtn_model, _, rtn = _run(float_dir, registry.make_method("rtn"))
    model, _, report = _run(float_dir, AutoRound(AutoRoundOptions(iters=0)))
    assert set(report.layers) == set(rtn.layers)
    for name, res in report.layers.items():
        assert torch.equal(model.get_submodule(name).weight, rtn_model.get_submodule(name).weight), name
        assert torch.equal(res.scale, rtn.layers[name].scale) and torch.equal(res.zero, rtn.layers[name].zero)


@pytest.mark.parametrize("spec", [SPEC, GridSpec(bits=2, group_size=32, mse=True)], ids=["minmax", "mse-2bit"])
def test_gptq_init_starts_from_gptqs_codes(float_dir, spec):
    """Block 0's q/k/v see the captured inputs in both runs: GPTQ's codes there are the target of the init (with
    --mse, GPTQ's codes on the MSE grid, which is also where the range factors start)."""
    reference = _load(float_dir)
    adapter = adapter_for(reference.config)
    chunks = capture_block_inputs(reference, adapter, _batches(), CPU)
    block = adapter.block_list(reference)[0]
    acc = HessianAccumulator(block.self_attn.q_proj.in_features, CPU)
    hook = block.self_attn.q_proj.register_forward_pre_hook(lambda _m, a: acc.add(a[0]))
    with torch.no_grad():
        for c in chunks:
            _out(block, c)
    hook.remove()
    hessian = acc.take()
    model, _, report = _run(float_dir, AutoRound(AutoRoundOptions(iters=0, init="gptq")), spec)
    checked = 0
    for lin in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{lin}"
        w = reference.get_submodule(name).weight.data.float()
        gptq = gptq_solve([w], hessian.clone(), spec, [name], GPTQOptions(act_order="static"))[0].weight
        scale, zero = fit_groups(w, spec)
        idx = torch.arange(w.shape[1]) // spec.group_size
        s = scale[:, idx]
        reachable = ((gptq - w) / s).abs() < 0.499  # GPTQ's code within half a step: an offset reaches it
        got = model.get_submodule(name).weight.data
        assert torch.equal(got[reachable], gptq[reachable]), name
        assert reachable.float().mean() > 0.8
        rtn = (quantize_codes(w, s, zero[:, idx], spec.maxq) - zero[:, idx]) * s
        assert (got != rtn).float().mean() > 0.02  # the init moved codes away from round-to-nearest
        checked += 1
    assert checked == 3 and report.layers


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq_v2"])
def test_autoround_output_packs_exactly(float_dir, tmp_path, fmt):
    out = tmp_path / "fake"
    quantize(QuantizeOptions(output=str(out), model=str(float_dir), method="autoround", bits=4, group_size=32,
                             nsamples=4, seqlen=64, device="cpu", progress=False, method_options={"iters": 4}))
    _, spec, meta = read_source(out)
    expected = dict(source_layers(out, spec, meta["layers"]))
    weights = load_file(str(out / "model.safetensors"))
    packed = save_packed(out, tmp_path / fmt, fmt)
    got = {name: q for name, _, q in read_packed(packed)}
    assert set(got) == set(expected) and len(got) == 14
    for name, q in got.items():
        for field in ("codes", "scale", "zero"):
            assert torch.equal(getattr(q, field), getattr(expected[name], field)), (name, field)
        assert torch.equal(q.dequantize(), weights[f"{name}.weight"].float()), name


@pytest.mark.parametrize("options, message", [
    ({"iters": -1}, "--iters must be a non-negative"),
    ({"batch": 0}, "--batch must be a positive"),
    ({"init": "awq2"}, "--init must be one of"),
    ({"lr": -0.1}, "--lr must be >= 0"),
    ({"trim": -0.01}, "--trim must be a fraction in"),
    ({"trim": 0.5}, "--trim must be a fraction in"),
])
def test_bad_options_fail_with_one_line(options, message):
    with pytest.raises(TritonqError, match=message):
        registry.make_method("autoround", options)


def test_mse_starts_from_the_mse_grid(float_dir):
    """With --mse the range factors start at the MSE search's shrink: zero steps give --mse round-to-nearest bit for
    bit, and the start differs from the min-max one (the search shrinks some groups at 2 bits)."""
    mse = GridSpec(bits=2, group_size=32, mse=True)
    tuned = _run(float_dir, AutoRound(AutoRoundOptions(iters=0)), mse)[0]
    rtn = _run(float_dir, registry.make_method("rtn"), mse)[0]
    plain = _run(float_dir, AutoRound(AutoRoundOptions(iters=0)), GridSpec(bits=2, group_size=32))[0]
    names = [n for n, m in tuned.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    assert names
    for name in names:
        assert torch.equal(tuned.get_submodule(name).weight, rtn.get_submodule(name).weight), name
    assert any(not torch.equal(tuned.get_submodule(n).weight, plain.get_submodule(n).weight) for n in names)


class FloatProbe(BlockProbe):
    """The probe of test_block_scope, asking for targets on the float path (``float_targets``)."""

    name = "test-block-float-probe"
    float_targets = True


def test_float_targets_follow_the_float_path(float_dir):
    """With ``float_targets`` block 1's targets are the float block 1 on the float block 0's outputs, while its inputs
    are still the quantized block 0's outputs; without it, the float block 1 on those quantized inputs."""
    original = _load(float_dir)
    adapter = adapter_for(original.config)
    entering = capture_block_inputs(original, adapter, _batches(), CPU)
    seen = {}
    for probe in (FloatProbe(), BlockProbe()):
        BlockProbe.seen.clear()
        quantize_blocks(_load(float_dir), adapter, probe, SPEC, CPU, _batches(), progress=False)
        seen[probe.name] = list(BlockProbe.seen)
    b0, b1 = adapter.block_list(original)[:2]
    with torch.no_grad():
        for c, chunk in enumerate(entering):
            float_in = _out(b0, chunk)
            float_out = _out(b1, Chunk(float_in, chunk.kwargs))
            got = seen[FloatProbe.name][1]
            torch.testing.assert_close(got["targets"][c], float_out, rtol=0, atol=1e-6)
            assert (got["inputs"][c] - float_in).abs().max() > 1e-4  # the inputs are the quantized path's
            q_out = _out(b1, Chunk(got["inputs"][c], chunk.kwargs))
            torch.testing.assert_close(seen[BlockProbe.name][1]["targets"][c], q_out, rtol=0, atol=1e-6)
            assert (q_out - float_out).abs().max() > 1e-4


def test_awq_init_folds_awqs_scales_first(float_dir):
    """``--init awq`` with no steps: block 0's q/k/v (searched on the same inputs as AWQ's own first group) are AWQ's
    (scales folded, no clip) bit for bit, and the folded norm is AWQ's; the tuning starts from folded weights."""
    awq_model, _, _ = _run(float_dir, registry.make_method("awq", {"no_clip": True}))
    model, _, report = _run(float_dir, AutoRound(AutoRoundOptions(iters=0, init="awq")))
    rtn_model, _, _ = _run(float_dir, registry.make_method("rtn"))
    prefix = "model.layers.0."
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "input_layernorm"):
        assert torch.equal(model.get_submodule(prefix + name).weight, awq_model.get_submodule(prefix + name).weight)
    q = prefix + "self_attn.q_proj"
    assert not torch.equal(model.get_submodule(q).weight, rtn_model.get_submodule(q).weight)  # the fold mattered
    assert len(report.layers) == 14 and all(r.scale.numel() > 0 for r in report.layers.values())


def test_batch_order_follows_the_seed(float_dir, monkeypatch):
    """The steps' window order is drawn from the run's seed and the block index: seed 0 keeps the order that the block
    index alone gave before the seed was used (its results are unchanged), another seed draws other batches, and so
    other offsets; one seed twice gives the same weights."""
    from tritonq.engine.methods import autoround

    orders = []

    class Recording(autoround._WindowSampler):
        def __init__(self, count, batch, generator):
            super().__init__(count, batch, generator)
            orders.append(self.order.clone())

    monkeypatch.setattr(autoround, "_WindowSampler", Recording)
    options = AutoRoundOptions(iters=6, batch=2)  # 6 windows in batches of 2: the order picks each step's windows
    weights = {}
    for seed in (0, 1, 0):
        orders.clear()
        model = _load(float_dir)
        adapter = adapter_for(model.config)
        quantize_blocks(model, adapter, AutoRound(options), SPEC, CPU, _batches(), progress=False, seed=seed)
        count = len(adapter.block_list(model))
        assert len(orders) == count
        expected = [torch.randperm(6, generator=torch.Generator().manual_seed(i)) for i in range(count)]
        same = [torch.equal(o, e) for o, e in zip(orders, expected)]
        assert all(same) if seed == 0 else not any(same), (seed, orders)
        layers = [n for n, _ in model.named_modules() if n.endswith("proj")]
        weights.setdefault(seed, []).append(torch.cat([model.get_submodule(n).weight.flatten() for n in layers]))
    assert torch.equal(weights[0][0], weights[0][1])
    assert not torch.equal(weights[0][0], weights[1][0])


@pytest.mark.slow
def test_killed_autoround_resumes_byte_identical(tmp_path):
    """The float path (``float_targets``) is part of what the work directory keeps: a run killed after block 1 and
    resumed writes the same bytes as one never interrupted (the steps' window order is seeded per block and seed)."""
    from helpers import tiny_config, tiny_tokenizer
    from test_resume import _args, _cli, _weights
    from transformers import LlamaForCausalLM

    model_dir = tmp_path / "model"
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_config(num_hidden_layers=3)).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    extra = ("--method", "autoround", "--iters", "3", "--bits", "3")
    full = _cli(_args(model_dir, tmp_path / "full", *extra))
    assert full.returncode == 0, full.stderr
    out = tmp_path / "out"
    assert _cli(_args(model_dir, out, *extra), kill=("after", 1)).returncode == -9
    resumed = _cli(_args(model_dir, out, *extra, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _weights(out) == _weights(tmp_path / "full")


def test_recipe_carries_the_float_path_through_group_blocks(float_dir):
    """A recipe with GPTQ on block 0 and a float-target block method on block 1: block 0 (group scope) carries the
    float path, so block 1's targets are the float block 1 on the float block 0's outputs."""
    from tritonq.engine.methods.recipe import RecipeMethod
    from tritonq.engine.preflight import block_widths
    from tritonq.engine.recipe import Recipe

    registry.register(FloatProbe)
    try:
        recipe = Recipe.from_dict({"default": {"method": "gptq"},
                                   "rules": [{"match": r"layers\.1\.", "method": FloatProbe.name}]})
        method = RecipeMethod(recipe, "gptq")
        original = _load(float_dir)
        adapter = adapter_for(original.config)
        method.bind(adapter, block_widths(original.config, adapter), SPEC)
        assert method.float_targets and [method.block_scope(i) for i in (0, 1)] == ["group", "block"]
        BlockProbe.seen.clear()
        quantize_blocks(_load(float_dir), adapter, method, SPEC, CPU, _batches(), progress=False)
    finally:
        registry.METHODS.pop(FloatProbe.name, None)
    (seen,) = BlockProbe.seen
    entering = capture_block_inputs(original, adapter, _batches(), CPU)
    b0, b1 = adapter.block_list(original)[:2]
    with torch.no_grad():
        for c, chunk in enumerate(entering):
            float_out = _out(b1, Chunk(_out(b0, chunk), chunk.kwargs))
            torch.testing.assert_close(seen["targets"][c], float_out, rtol=0, atol=1e-6)
            assert (_out(b1, Chunk(seen["inputs"][c], chunk.kwargs)) - float_out).abs().max() > 1e-4


@pytest.fixture
def fresh_compile():
    """No compiled step loss or recorded compiler failure carried over from another test."""
    from tritonq.engine.methods.autoround import _StepLoss
    _StepLoss._compiled, _StepLoss._failed = None, False
    torch._dynamo.reset()
    yield _StepLoss
    _StepLoss._compiled, _StepLoss._failed = None, False


def test_compile_matches_eager_with_one_graph_for_every_block(float_dir, fresh_compile):
    from torch._dynamo.utils import counters
    counters.clear()
    runs = {c: _run(float_dir, AutoRound(AutoRoundOptions(iters=6, compile=c))) for c in (False, True)}
    reports = {c: run[2] for c, run in runs.items()}
    assert counters["stats"]["unique_graphs"] == 1  # every block reuses the one graph
    assert fresh_compile._compiled is not None and not fresh_compile._failed
    assert len({name.split(".mlp")[0].split(".self_attn")[0] for name in reports[True].layers}) > 1
    for name, eager in reports[False].layers.items():
        compiled = reports[True].layers[name]
        # round-to-nearest's loss, the first step's, is the same function of the same weights (the compiled fake
        # quantization keeps the scales' fp16 rounding: without it 68% of the weights below differ)
        assert compiled.info["loss_first_step"] == pytest.approx(eager.info["loss_first_step"], rel=1e-4), name
        assert compiled.info["loss"] <= compiled.info["loss_first_step"]
        weights = [runs[c][0].get_submodule(name).weight for c in (False, True)]
        differ = (weights[0] != weights[1]).float().mean().item()
        assert differ < 0.05, (name, differ)  # signed steps on gradients that differ only by rounding


def test_compile_failure_warns_and_runs_eagerly(float_dir, fresh_compile, monkeypatch):
    def broken(fn, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler found\nsecond line")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    eager = _run(float_dir, AutoRound(AutoRoundOptions(iters=4)))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: no C\\+\\+ compiler found.; running"):
        fallback = _run(float_dir, AutoRound(AutoRoundOptions(iters=4, compile=True)))
    assert fresh_compile._failed
    for name in eager[2].layers:
        assert torch.equal(eager[0].get_submodule(name).weight, fallback[0].get_submodule(name).weight), name


@pytest.mark.parametrize("trim", [0.0, 0.001, 0.05])
def test_trimmed_mse_matches_a_float64_reference(trim):
    from tritonq.engine.methods.autoround import trimmed_mse
    gen = torch.Generator().manual_seed(7)
    target = torch.randn(3, 40, 48, generator=gen)
    output = (target + 0.1 * torch.randn(target.shape, generator=gen)).requires_grad_(True)
    with torch.no_grad():  # a few outlier errors, as SmolLM2's massive activations give
        output[0, 0, :5] += 30.0
    loss = trimmed_mse(output, target, trim)
    squared = (output.detach().double() - target.double()).square().flatten()
    left_out = int(trim * squared.numel())
    expected = squared.sort().values[:squared.numel() - left_out].sum() / squared.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if trim == 0.0:
        assert torch.equal(loss, torch.nn.functional.mse_loss(output, target))
    (grad,) = torch.autograd.grad(loss, output)
    grad = grad.flatten()
    dropped = squared.topk(left_out).indices if left_out else torch.empty(0, dtype=torch.long)
    assert left_out == 0 or (grad[dropped] == 0).all()
    kept = torch.ones_like(grad, dtype=torch.bool)
    kept[dropped] = False
    diff = (output.detach() - target).flatten()
    torch.testing.assert_close(grad[kept], 2 * diff[kept] / squared.numel(), rtol=1e-5, atol=1e-9)
    assert left_out == 0 or (grad[kept] != 0).all()


def test_trim_changes_the_steps(float_dir):
    """Leaving 5% of the output errors out moves the signs of the steps: the weights differ from the plain MSE run's,
    and the kept loss (the trimmed one) is below that run's first-step loss."""
    plain = _run(float_dir, AutoRound(AutoRoundOptions(iters=6)))
    trimmed = _run(float_dir, AutoRound(AutoRoundOptions(iters=6, trim=0.05)))
    names = list(plain[2].layers)
    assert any(not torch.equal(plain[0].get_submodule(n).weight, trimmed[0].get_submodule(n).weight) for n in names)
    for name in names:
        assert trimmed[2].layers[name].info["loss_first_step"] < plain[2].layers[name].info["loss_first_step"], name
