"""The method interface and the one-pass pipeline on tiny random models of every family.

* the staged single pass gives the GPTQ weights of the plain true-sequential loop (a partial forward per
  group, then a full forward to propagate), which is written out here as the oracle;
* every linear of a block runs exactly once per calibration chunk;
* a toy method registered from this file observes mean |x|, folds scales through every declared pair,
  and leaves the float model's outputs unchanged to float64 tolerance;
* queries and keys observed after RoPE are what the attention computes; wrappers serve propagation only.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from test_pipeline import FAMILIES, make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec
from tritonq.engine.hessian import HessianAccumulator
from tritonq.engine.methods import registry
from tritonq.engine.methods.base import LayerResult, Method
from tritonq.engine.methods.gptq import GPTQOptions, solve
from tritonq.engine.pipeline import capture_block_inputs, quantize_blocks
from tritonq.engine.stages import StopForward
from tritonq.errors import TritonqError

SPEC = GridSpec(bits=3, group_size=32)


def _load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _batches(vocab=256, n=6, seqlen=64, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return list(torch.split(torch.randint(0, vocab, (n, seqlen), generator=gen), batch))


def _sequential_reference(model, adapter, batches, options):
    """The loop before the one-pass pipeline: a partial forward per group, a full forward to propagate."""
    chunks = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    layers = {}
    for i, block in enumerate(adapter.block_list(model)):
        for names in adapter.linear_groups:
            linears = [block.get_submodule(n) for n in names]
            acc = HessianAccumulator(linears[0].in_features, "cpu")

            def stop(_m, args, acc=acc):
                acc.add(args[0])
                raise StopForward

            handle = linears[0].register_forward_pre_hook(stop)
            for chunk in chunks:
                try:
                    block(chunk.hidden, **chunk.kwargs)
                except StopForward:
                    pass
            handle.remove()
            full = [f"{adapter.blocks}.{i}.{n}" for n in names]
            for lin, name, res in zip(linears, full, solve([x.weight.data for x in linears], acc.hessian, SPEC,
                                                            full, options)):
                lin.weight.data.copy_(res.weight)
                layers[name] = res
        for chunk in chunks:
            out = block(chunk.hidden, **chunk.kwargs)
            chunk.hidden = out[0] if isinstance(out, tuple) else out
    return layers


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_pass_matches_sequential_reference(tmp_path, family, monkeypatch):
    src = make_family_model(tmp_path / "float", family)
    options = GPTQOptions(act_order="static", damp=0.05)
    reference_model, model = _load(src), _load(src)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        expected = _sequential_reference(reference_model, adapter, _batches(), options)
        names = {mod: name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
        calls: dict[str, int] = {}
        linear_forward = nn.Linear.forward

        def counted(self, x):  # a replayed module has its own ``forward`` and never gets here
            calls[names[self]] = calls.get(names[self], 0) + 1
            return linear_forward(self, x)

        monkeypatch.setattr(nn.Linear, "forward", counted)
        report = quantize_blocks(model, adapter, registry.make_method("gptq", options), SPEC,
                                 torch.device("cpu"), _batches(), progress=False)
        monkeypatch.undo()
        calls = {n: c for n, c in calls.items() if n in expected}
    assert set(report.layers) == set(expected)
    for name, mod in model.named_modules():
        if name in expected:
            torch.testing.assert_close(mod.weight.data, expected[name].weight, rtol=0, atol=1e-6, msg=name)
            assert torch.equal(report.layers[name].scale, expected[name].scale.cpu()), name
    # one forward per block: every linear ran once per calibration chunk (3 chunks), the replays did the rest
    assert calls and set(calls.values()) == {3}, calls


def test_rtn_needs_no_data_and_matches_the_grid(tmp_path):
    from tritonq.engine.methods.rtn import round_to_nearest

    model = _load(make_family_model(tmp_path / "float", "llama"))
    originals = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    adapter = adapter_for(model.config)
    report = quantize_blocks(model, adapter, registry.make_method("rtn"), SPEC, torch.device("cpu"), None,
                             progress=False)
    for name, mod in model.named_modules():
        if name in report.layers:
            assert torch.equal(mod.weight.data, round_to_nearest(originals[name], SPEC, name).weight), name


@dataclass(frozen=True)
class ToyOptions:
    alpha: float = 0.5


class MeanAbsFold(Method):
    """A toy AWQ-like method: scale s = mean|x|^alpha per input channel, folded through every pair whose
    balance linears are in this group; the weights are returned unquantized."""

    name = "toy-fold"
    Options = ToyOptions

    def observe(self, group):
        pairs = [p for p in group.adapter.scale_pairs(group.config) if p.smooth not in group._done
                 and any(b in group.names for b in p.balance + (p.smooth,))]
        stats = {}
        for pair in pairs:
            stats[pair] = []
            group.on_input(pair.balance[0], lambda x, s=stats[pair]: s.append(x.abs().reshape(-1, x.shape[-1])))
        return stats

    def quantize(self, group, state):
        for pair, xs in state.items():
            s = torch.cat(xs).mean(0).clamp(min=1e-4) ** self.options.alpha
            group.fold(pair, s.double())
        out = []
        for lin in group.linears:
            w = lin.weight.data
            k = w.shape[1]
            out.append(LayerResult(w.clone(), torch.ones(w.shape[0], 1), torch.zeros(w.shape[0], 1),
                                   torch.zeros(k, dtype=torch.int32)))
        return out


@pytest.mark.parametrize("family,kv_heads", [("llama", 4), ("llama", 2), ("opt", None)])
def test_toy_method_folds_scales_without_changing_the_float_model(tmp_path, family, kv_heads):
    registry.register(MeanAbsFold)
    src = make_family_model(tmp_path / "float", family)
    model = _load(src).double()
    if kv_heads is not None and kv_heads != model.config.num_key_value_heads:
        from transformers import AutoModelForCausalLM

        model.config.num_key_value_heads = kv_heads
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config).eval().double()
    adapter = adapter_for(model.config)
    pairs = adapter.scale_pairs(model.config)
    has_vo = any(p.smooth.endswith("v_proj") for p in pairs)
    assert has_vo == (family == "opt" or kv_heads == model.config.num_attention_heads)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        quantize_blocks(model, adapter, registry.make_method("toy-fold"), SPEC, torch.device("cpu"),
                        [b.to(torch.long) for b in _batches(n=4)], progress=False)
        after = model(input_ids=ids).logits
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    smooths = {p.smooth for p in pairs}
    assert all(any(f".{s}." in f".{n}" for n in changed) for s in smooths), (smooths, changed)
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)


def test_fold_into_an_already_quantized_linear_is_refused(tmp_path):
    class LateFold(MeanAbsFold):
        name = "toy-late-fold"

        def observe(self, group):
            if group.names == ("mlp.down_proj",):
                pair = next(p for p in group.adapter.scale_pairs(group.config) if p.smooth == "mlp.up_proj")
                return {pair: [torch.ones(1, group.linears[0].in_features)]}
            return {}

    model = _load(make_family_model(tmp_path / "float", "llama"))
    with pytest.raises(TritonqError, match="already quantized"):
        quantize_blocks(model, adapter_for(model.config), LateFold(), SPEC, torch.device("cpu"), _batches(),
                        progress=False)


def test_attention_observer_sees_queries_and_keys_after_rope(tmp_path):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    class Watch(MeanAbsFold):
        name = "toy-watch"

        def observe(self, group):
            seen = {"q": [], "k": [], "x": []}
            if group.names[0] == "self_attn.q_proj":
                group.on_input("self_attn.q_proj", seen["x"].append)
                group.on_attention(lambda q, k: (seen["q"].append(q), seen["k"].append(k)))
            return seen

        def quantize(self, group, state):
            if state["q"]:
                attn = group.block.self_attn
                x = state["x"][0]
                shape = (*x.shape[:-1], -1, attn.head_dim)
                q = attn.q_proj(x).view(shape).transpose(1, 2)
                k = attn.k_proj(x).view(shape).transpose(1, 2)
                cos, sin = self.position_embeddings[0]
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                torch.testing.assert_close(state["q"][0], q, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(state["k"][0], k, rtol=1e-6, atol=1e-6)
                assert k.shape[1] == group.config.num_key_value_heads
                self.checked += 1
            return super().quantize(group, {})

    model = _load(make_family_model(tmp_path / "float", "llama"))
    adapter = adapter_for(model.config)
    watch = Watch()
    watch.checked = 0
    chunks = capture_block_inputs(model, adapter, _batches(), torch.device("cpu"))
    watch.position_embeddings = [c.kwargs["position_embeddings"] for c in chunks]
    implementation = model.config._attn_implementation
    with torch.no_grad():
        quantize_blocks(model, adapter, watch, SPEC, torch.device("cpu"), _batches(), progress=False)
    assert watch.checked == model.config.num_hidden_layers
    assert model.config._attn_implementation == implementation  # restored


def test_wrappers_run_during_propagation_only(tmp_path):
    class Doubler(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    class Wrapping(MeanAbsFold):
        name = "toy-wrap"
        made: list = []

        def observe(self, group):
            return {}

        def wrap(self, group, name, linear):
            if name == "mlp.gate_proj":
                self.made.append(Doubler(linear))
                return self.made[-1]
            return None

    model = _load(make_family_model(tmp_path / "float", "llama"))
    with torch.no_grad():
        quantize_blocks(model, adapter_for(model.config), Wrapping(), SPEC, torch.device("cpu"), _batches(),
                        progress=False)
    assert [w.calls for w in Wrapping.made] == [3, 3]  # the final stage of each block ran through the wrapper
    assert all(isinstance(b.mlp.gate_proj, nn.Linear) for b in model.model.layers)


def test_registry_and_options():
    assert {"rtn", "gptq"} <= set(registry.METHODS)
    with pytest.raises(TritonqError, match="unknown method"):
        registry.make_method("nope")
    with pytest.raises(TritonqError, match="does not take damp"):
        registry.make_method("rtn", {"damp": 0.1})
    assert registry.make_method("gptq", {"damp": 0.2}).options.damp == 0.2
    with pytest.raises(TritonqError, match="act-order"):
        registry.make_method("gptq", {"act_order": "sideways"})
