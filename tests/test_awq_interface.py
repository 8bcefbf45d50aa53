"""The pipeline's ``Group.on_call`` (added for AWQ): a method sees a module's whole call (positional and
keyword arguments) and can call the module again in ``quantize`` with the same result."""

import torch
from test_method_interface import _batches, _load
from test_pipeline import make_family_model
from tritonq.engine.adapters import adapter_for
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.base import Method
from tritonq.engine.methods.rtn import round_to_nearest
from tritonq.engine.pipeline import quantize_blocks

SPEC = GridSpec(bits=3, group_size=32)


class ReplayAttention(Method):
    """Records the attention's calls and outputs in the q/k/v stage, calls it again, then plain RTN."""

    name = "toy-replay-attention"

    def __init__(self):
        super().__init__()
        self.checked = 0
        self.quantized_seen = []

    def observe(self, group):
        seen = {"calls": [], "outputs": []}
        if group.names[0] == "self_attn.q_proj":
            group.on_call("self_attn", lambda args, kwargs: seen["calls"].append((args, dict(kwargs))))
            group.on_output("self_attn", lambda _x, out: seen["outputs"].append(out[0].clone()))
        self.quantized_seen.append((group.names[0], group.is_quantized("self_attn.q_proj")))
        return seen

    def quantize(self, group, state):
        for (args, kwargs), expected in zip(state["calls"], state["outputs"]):
            assert "hidden_states" in kwargs or args  # the block passes hidden states by keyword
            again = group.block.self_attn(*args, **kwargs)[0]
            torch.testing.assert_close(again, expected, rtol=0, atol=0)
            self.checked += 1
        return [round_to_nearest(lin.weight.data, group.spec) for lin in group.linears]


def test_on_call_captures_a_replayable_call(tmp_path):
    model = _load(make_family_model(tmp_path / "float", "llama"))
    method = ReplayAttention()
    with torch.no_grad():
        quantize_blocks(model, adapter_for(model.config), method, SPEC, torch.device("cpu"), _batches(),
                        progress=False)
    assert method.checked == 3 * model.config.num_hidden_layers  # 3 chunks per block
    groups = len(adapter_for(model.config).linear_groups)
    assert [q for _n, q in method.quantized_seen[:groups]] == [False, True, True, True]
