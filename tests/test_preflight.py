"""Preflight (``engine/preflight.py``): the method's declared contract, the output format and the kernels' limits
are asked once, before calibration data or the model is loaded.

* ``--act-order dynamic --format gguf`` (GPTQ, and AWQ+GPTQ, whose missing ``act_order_groups`` let it through)
  fails in seconds with one line, and never reaches the calibration loader; the same run with static groups
  passes preflight and does reach it (the control);
* every method declares its act-order groups; ``WithActivationQuant`` answers every contract item with its
  inner method's;
* the grid of every linear of every block comes from ``layer_grid`` and is checked, the last block included;
* ``kernels/configs.check_limits`` refuses what a kernel's ``LIMITS`` do not cover, naming the kernel, the
  value and the fix, and preflight applies it to the kernels of the run's device and output.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from helpers import tiny_config, tiny_tokenizer
from test_gguf import bpe_tokenizer, gguf_export_config
from tritonq.cli import main
from tritonq.engine import api
from tritonq.engine.activations import ActSpec
from tritonq.engine.grid import GridSpec
from tritonq.engine.methods.act_quant import WithActivationQuant
from tritonq.engine.methods.awq import AWQGPTQ, AWQGPTQOptions
from tritonq.engine.methods.awrq import AWRQ
from tritonq.engine.methods.base import Method, NoOptions
from tritonq.engine.methods.registry import METHODS, make_method
from tritonq.engine.preflight import check_kernel_limits, preflight
from tritonq.errors import TritonqError
from tritonq.kernels.configs import KernelLimits, check_limits


class CalibrationReached(Exception):
    """Raised by the patched loaders: the run got past preflight."""


def _refuse(*args, **kwargs):
    raise CalibrationReached


@pytest.fixture
def no_calibration(monkeypatch):
    """Every loader quantize calls after preflight raises :class:`CalibrationReached`."""
    for name in ("load_corpus", "calibration_windows", "load_model"):
        monkeypatch.setattr(api, name, _refuse)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """A tiny Llama that GGUF can hold (BPE tokenizer with merges), four blocks."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    LlamaForCausalLM(gguf_export_config()).save_pretrained(path)
    bpe_tokenizer().save_pretrained(path)
    return path


def _quantize(model, out, method, act_order):
    return main(["quantize", "--model", str(model), "--method", method, "--act-order", act_order, "--bits", "4",
                 "--group-size", "32", "--format", "gguf", "--seqlen", "128", "--device", "cpu", "--no-progress",
                 "--output", str(out)])


@pytest.mark.parametrize("method", ["awq+gptq", "gptq"])
def test_dynamic_act_order_to_gguf_fails_before_calibration(gguf_model, tmp_path, capsys, no_calibration, method):
    t0 = time.perf_counter()
    rc = _quantize(gguf_model, tmp_path / "q", method, "dynamic")
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("tritonq: error: GGUF") and "--act-order dynamic" in err[0]
    assert "--act-order static" in err[0]  # the fix
    assert not (tmp_path / "q").exists()
    assert seconds < 60  # config, tokenizer and a meta skeleton only (a fraction of a second when idle)
    # the control: static groups are what GGUF holds, so the same run passes preflight and reaches calibration
    with pytest.raises(CalibrationReached):
        _quantize(gguf_model, tmp_path / "q", method, "static")


def test_every_method_declares_its_act_order_groups():
    expected = {"gptq": "static", "awrq": "static", "awq+gptq": "static", "rtn": None, "awq": None, "dh-awq": None,
                "smoothquant": None, "boa": "static", "aboa": "static", "autoround": None,
                "auto": "static"}  # the defaults (BoA's column act-order; auto's GPTQ)
    assert {name: make_method(name).act_order_groups() for name in METHODS} == expected
    for name in ("gptq", "awrq", "awq+gptq"):
        for order in ("dynamic", "static", None):
            method = make_method(name, {"act_order": order})
            assert method.act_order_groups() == order
            if "act_order_groups" in method.describe():  # quantization.json keeps its keys and values
                assert method.describe()["act_order_groups"] == order
    assert "act_order_groups" not in AWQGPTQ(AWQGPTQOptions(act_order="dynamic")).describe()  # same bytes as before
    for name in ("boa", "aboa"):  # column act-order keeps every group's grid: static groups, trivial g_idx
        assert make_method(name, {"act_order_col": True}).act_order_groups() == "static"
        assert make_method(name, {"act_order_row": True, "act_order_col": False}).act_order_groups() is None


class _Toy(Method):
    """A method whose every contract item differs from the base's, to see the wrapper pass them through."""

    name = "toy-contract"
    Options = NoOptions
    calibrated = False
    default_act = ActSpec(bits=6, scheme="per-tensor", sym=False)
    receives_act = True
    needs_grad = True
    scope = "block"

    def __init__(self) -> None:
        super().__init__()
        self.received: list[ActSpec] = []
        self.prepared: list[tuple] = []

    def set_activation(self, act: ActSpec) -> None:
        self.received.append(act)

    def act_order_groups(self) -> str | None:
        return "dynamic"

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        return replace(spec, bits=8) if name.endswith("down_proj") else spec

    def prepare(self, model, adapter) -> None:
        self.prepared.append((model, adapter))

    def quantize_block(self, *args, **kwargs):
        return ("block", args, kwargs)


def test_wrapper_delegates_every_contract_item():
    inner = _Toy()
    act = ActSpec(bits=4, scheme="per-token", sym=True)
    wrapped = WithActivationQuant(inner, act)
    assert inner.received == [act]  # receives_act: the run's setting, once, at wrapping
    for item in ("calibrated", "default_act", "receives_act", "needs_grad", "scope", "name", "options"):
        assert getattr(wrapped, item) == getattr(inner, item), item
    assert wrapped.act_order_groups() == "dynamic"
    spec = GridSpec(4, 32)
    assert wrapped.layer_grid("model.layers.3.mlp.down_proj", spec).bits == 8
    assert wrapped.layer_grid("model.layers.3.mlp.up_proj", spec) == spec
    model, adapter = object(), object()
    wrapped.prepare(model, adapter)
    assert inner.prepared == [(model, adapter)]
    assert wrapped.quantize_block(1, k=2) == ("block", (1,), {"k": 2})
    other = ActSpec(bits=8)
    wrapped.set_activation(other)
    assert inner.received == [act, other] and wrapped.act == other
    # a method that does not declare receives_act is never handed the setting
    gptq = make_method("gptq")
    WithActivationQuant(gptq, act)
    with pytest.raises(NotImplementedError):
        gptq.set_activation(act)


def test_awrq_receives_the_run_setting():
    method = AWRQ()
    assert method.act == AWRQ.default_act
    act = ActSpec(bits=6, scheme="per-token", sym=True)
    WithActivationQuant(method, act)
    assert method.act == act


def _plain_model(tmp_path, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(**overrides)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


def _preflight(model, method, spec, out_format="fake", device="cpu", act_bits=None):
    return preflight(method, model, spec, default_group=False, act_bits=act_bits, act_scheme=None, act_sym=None,
                     out_format=out_format, tokenizer=tiny_tokenizer(), device=torch.device(device),
                     dtype=torch.float32)


def test_grids_of_every_block(tmp_path):
    model = _plain_model(tmp_path, num_hidden_layers=3)
    run = _preflight(model, _Toy(), GridSpec(4, 32))
    assert len(run.grids) == 3 * 7 and set(run.widths) == set(run.grids)
    for name, grid in run.grids.items():
        assert grid.bits == (8 if name.endswith("down_proj") else 4), name
    assert run.widths["model.layers.2.mlp.down_proj"] == 128
    assert isinstance(run.method, WithActivationQuant) and run.act == _Toy.default_act


class _LastBlockGrid(Method):
    """Gives the last block's MLP a group of 48, which does not divide its widths (64, 128)."""

    name = "toy-last-block"

    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        return replace(spec, group_size=48) if name.startswith("model.layers.2.mlp.") else spec


def test_a_grid_that_does_not_divide_in_the_last_block_is_refused(tmp_path):
    model = _plain_model(tmp_path, num_hidden_layers=3)
    with pytest.raises(TritonqError, match=r"model\.layers\.2\.mlp\.gate_proj"):
        _preflight(model, _LastBlockGrid(), GridSpec(4, 32))


class _SplitGroup(_LastBlockGrid):
    def layer_grid(self, name: str, spec: GridSpec) -> GridSpec:
        return replace(spec, bits=8) if name.endswith("k_proj") else spec


def test_linears_of_one_group_must_share_a_grid(tmp_path):
    model = _plain_model(tmp_path)
    with pytest.raises(TritonqError, match="different grids"):
        _preflight(model, _SplitGroup(), GridSpec(4, 32))


def test_check_limits_names_kernel_value_and_fix():
    lim = KernelLimits(dtypes=("fp16", "bf16"), max_cols=256, bits=(4,), group_multiple=8, k_multiple=8)
    check_limits("k", lim, dtype="bf16", bits=4, group_size=-1, in_features=576, cols=256)
    check_limits("k", lim, group_size=64)
    check_limits("k", lim)  # nothing asked, nothing refused
    cases = [
        (dict(dtype="fp32"), r"the k kernel takes fp16 or bf16 inputs, got fp32.*--dtype float16 or bfloat16"),
        (dict(bits=3), r"the k kernel unpacks 4-bit codes, got 3 bits.*--bits 4"),
        (dict(group_size=12), r"the k kernel takes group sizes .* multiples of 8, got 12.*--group-size"),
        (dict(group_size=0), r"got 0"),
        (dict(in_features=100, where="model.layers.0.mlp.down_proj"),
         r"multiples of 8, got 100 \(model\.layers\.0\.mlp\.down_proj\).*pad"),
        (dict(cols=257), r"1 to 256 columns per launch, got 257.*split"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(TritonqError, match=pattern):
            check_limits("k", lim, **kwargs)
    check_limits("open", KernelLimits(dtypes=("fp32",)), bits=3, group_size=12, in_features=7, cols=10_000)


def test_preflight_checks_the_kernels_of_the_run():
    rtn, cpu = make_method("rtn"), torch.device("cpu")
    odd = {"model.layers.0.mlp.down_proj": 36}
    # a packed 4-bit output is served by the dequant-matmul kernels: widths must be multiples of 8
    with pytest.raises(TritonqError, match=r"dequant_matmul kernel .* got 36 \(model\.layers\.0\.mlp\.down_proj\)"):
        check_kernel_limits(rtn, "gptq", {n: GridSpec(4, -1) for n in odd}, odd, cpu, torch.float32)
    with pytest.raises(TritonqError, match="dequant_matmul kernel takes group sizes"):
        check_kernel_limits(rtn, "compressed-tensors", {n: GridSpec(4, 12) for n in odd}, {n: 48 for n in odd},
                            cpu, torch.float32)
    for fmt, grid in (("fake", GridSpec(4, -1)), ("gguf", GridSpec(4, -1)), ("gptq", GridSpec(3, -1))):
        check_kernel_limits(rtn, fmt, {n: grid for n in odd}, odd, cpu, torch.float32)  # not served by it
    grids = {n: GridSpec(4, 32) for n in ("a", "b")}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the declared limits take every run on CUDA
        check_kernel_limits(make_method("gptq"), "gptq", grids, {"a": 576, "b": 1536}, torch.device("cuda"), dtype)


def test_preflight_checks_the_calibration_kernels_on_cuda_only(monkeypatch):
    from tritonq.kernels import hessian_accum

    monkeypatch.setattr(hessian_accum, "LIMITS", KernelLimits(dtypes=("fp16",)))
    gptq, rtn = make_method("gptq"), make_method("rtn")
    with pytest.raises(TritonqError, match="the hessian_accum kernel takes fp16 inputs, got bf16"):
        check_kernel_limits(gptq, "fake", {}, {}, torch.device("cuda"), torch.bfloat16)
    check_kernel_limits(gptq, "fake", {}, {}, torch.device("cuda"), torch.float16)
    check_kernel_limits(gptq, "fake", {}, {}, torch.device("cpu"), torch.bfloat16)  # the CPU runs the references
    check_kernel_limits(rtn, "fake", {}, {}, torch.device("cuda"), torch.bfloat16)  # RTN runs no Hessian kernel
