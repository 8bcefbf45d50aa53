"""``QuantLinear`` on PyTorch's CPU int4 op (``aten._weight_int4pack_mm_for_cpu``) against the reference.

The op is asked for by name (``use_cpu_int4("aten")``); tritonq's own CPU op is tested in ``test_cpu_gemv.py``.

Oracle: the dense dequantized weight ``s * (q - z)`` (the stored scales) in a float64 matmul. The op rounds
x, s and ``zf = s * (8 - z)`` to bf16 (unit roundoff u = 2^-8) and its output to bf16, and accumulates in
fp32, so per output element

    |y - ref| <= (2 + u) u * sum_k |x_k| (|q_k - 8| s + |zf|) + u |y| + fp32 accumulation,

(x rounding: u |x| |w|; weight rounding: u |x| (|q - 8| s + |zf|) >= u |x| |w|; output rounding: u |y|).
The tolerance below is that bound with a small margin; the flipped-sign zero (``zf = s * (z - 8)``) breaks it,
which a negative control checks. A second, tighter oracle uses the op's own bf16 weights
(:meth:`QuantLinear.dequantized_weight` in the CPU layout), leaving only the activation and output rounding.
Layouts the op cannot take (odd group sizes, out_features not a multiple of 16, an act-order ``g_idx``
that is not a permutation of static groups) keep the reference path and match it to fp32 precision.
"""

from __future__ import annotations

import pytest
import torch
from tritonq.engine.activations import ActQuantLinear, ActSpec, fake_quantize_activation
from tritonq.engine.formats.records import PackedLinear
from tritonq.engine.runtime.qlinear import QuantLinear, cpu_int4_group, use_cpu_int4
from tritonq.kernels.dequant_matmul import dequant_matmul_ref, dequantize_int4
from tritonq.kernels.pack import pack_int4

U = 2.0**-8  # bf16 unit roundoff


def _packed(n: int, k: int, gs: int, *, sym: bool, act_order: bool = False, bias: bool = False,
            seed: int = 0, g_idx: torch.Tensor | None = None) -> PackedLinear:
    """Fresh random codes, fp16-representable scales, integer zeros (asym) and optionally act-order."""
    gen = torch.Generator().manual_seed(seed)
    g_eff = k if gs == -1 else gs
    groups = -(-k // g_eff)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(groups, n, generator=gen) * 0.05 + 0.002).half().float()
    zeros = None if sym else torch.randint(0, 16, (groups, n), generator=gen).float()
    if act_order:
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // g_eff).to(torch.int32)
    b = torch.randn(n, generator=gen) if bias else None
    return PackedLinear(pack_int4(codes), scales, zeros, g_idx, g_eff, k, n, b)


def _oracle(layer_ref: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``x @ W^T + b`` from the stored scales, and the per-element bound of the module docstring."""
    q = dequantize_int4(layer_ref.qweight, torch.ones_like(layer_ref.scales), None, layer_ref.group_size,
                        layer_ref.g_idx) + 8.0  # the codes, [K, N]
    k = q.shape[0]
    g = torch.arange(k) // layer_ref.group_size if layer_ref.g_idx is None else layer_ref.g_idx.long()
    s = layer_ref.scales.double()[g]
    z = layer_ref.zeros.double()[g] if layer_ref.zeros is not None else torch.full_like(s, 8.0)
    w = s * (q.double() - z)
    ref = x.double() @ w
    mag = x.double().abs() @ ((q.double() - 8).abs() * s + (s * (8 - z)).abs())
    tol = 1.1 * ((2 + U) * U * mag + U * ref.abs()) + k * 2.0**-22 * mag + 1e-6  # the op rounds before the bias
    if layer_ref.bias is not None:
        ref = ref + layer_ref.bias.double()
        tol = tol + 2.0**-23 * ref.abs()  # the fp32 bias add
    return ref, tol


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 64, 256, False), (5, 96, 384, True), (17, 160, 512, True)])
def test_cpu_int4_matches_dense_reference(gs, sym, m, n, k, bias):
    seed = gs * 1000 + m * 10 + int(sym)
    packed = _packed(n, k, gs, sym=sym, bias=bias, seed=seed)
    ref_layer = QuantLinear(packed, torch.float32)
    layer = QuantLinear(packed, torch.float32)
    assert layer.use_cpu_int4("aten") and layer.uses_cpu_int4 and layer.qweight is None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    ref, tol = _oracle(ref_layer, x)
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), float((err / tol).max())
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2  # bf16-level, not a structural error
    # the op's own weights (bf16 scale and zero): only activation and output rounding remain
    w = layer.dequantized_weight().double()
    tight = x.bfloat16().double() @ w.t()  # the op's result before its bf16 rounding; the bias comes after
    y_op = y.double() - (0 if packed.bias is None else packed.bias.double())
    slack = 1e-5 * x.abs().sum(-1, keepdim=True) + 2.0**-22 * y.double().abs()
    assert bool(((y_op - tight).abs() <= 1.1 * U * tight.abs() + slack).all())


def test_flipped_zero_sign_breaks_the_tolerance():
    """Negative control: the op's zero is ``zf = s * (8 - z)``; ``s * (z - 8)`` is far outside the bound."""
    packed = _packed(64, 256, 64, sym=False, seed=3)
    ref_layer = QuantLinear(packed, torch.float32)
    layer = QuantLinear(packed, torch.float32)
    layer.use_cpu_int4("aten")
    layer.scales_and_zeros[..., 1] *= -1
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    ref, tol = _oracle(ref_layer, x)
    assert bool(((layer(x).double() - ref).abs() > tol).any())


@pytest.mark.parametrize("gs", [32, 128])
def test_static_act_order_runs_the_op_through_an_input_permutation(gs):
    packed = _packed(48, 256, gs, sym=False, act_order=True, bias=True, seed=gs)
    ref_layer = QuantLinear(packed, torch.float32)
    layer = QuantLinear(packed, torch.float32)
    assert layer.use_cpu_int4("aten") and layer.input_order is not None
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(7))  # leading dims kept
    y = layer(x)
    assert y.shape == (3, 2, 48)
    ref, tol = _oracle(ref_layer, x.reshape(6, 256))
    assert bool(((y.reshape(6, 48).double() - ref).abs() <= tol).all())
    # dequantized_weight undoes the permutation: the original input order
    w_ref = ref_layer.dequantized_weight()
    assert float((layer.dequantized_weight() - w_ref).abs().max()) <= 2 * U * float(w_ref.abs().max())


@pytest.mark.parametrize("k", [512, 96])
def test_per_channel_runs_on_repeated_sub_group_scales(k):
    """group_size == K is not a group size the op takes; one of its divisors is, with each scale repeated."""
    packed = _packed(32, k, -1, sym=False, seed=k)
    assert cpu_int4_group(k, 32, k, None) == (256 if k == 512 else 32)
    ref_layer = QuantLinear(packed, torch.float32)
    layer = QuantLinear(packed, torch.float32)
    assert layer.use_cpu_int4("aten")
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1))
    ref, tol = _oracle(ref_layer, x)
    assert bool(((layer(x).double() - ref).abs() <= tol).all())


def _non_static_g_idx(k: int, gs: int, seed: int) -> torch.Tensor:
    g = torch.randint(0, k // gs, (k,), generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    g[: k // gs] = torch.arange(k // gs, dtype=torch.int32)  # every group used, but unevenly
    return g


@pytest.mark.parametrize(
    ("n", "k", "gs", "g_idx", "reason"),
    [
        (64, 256, 16, None, "group_size=16"),
        (64, 240, 48, None, "group_size=48"),
        (40, 256, 64, None, "out_features=40"),
        (64, 256, 64, "uneven", "g_idx is not a permutation of static groups"),
    ],
)
def test_layouts_the_op_refuses_keep_the_reference_path(n, k, gs, g_idx, reason):
    gi = _non_static_g_idx(k, gs, 5) if g_idx == "uneven" else None
    packed = _packed(n, k, gs, sym=False, bias=True, seed=n + k + gs, g_idx=gi)
    layer = QuantLinear(packed, torch.float32)
    assert not layer.use_cpu_int4("aten")
    assert reason in layer.cpu_int4_refused and not layer.uses_cpu_int4 and layer.qweight is not None
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    expected = dequant_matmul_ref(x, layer.qweight, layer.scales, layer.zeros, group_size=layer.group_size,
                                  g_idx=layer.g_idx, bias=layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    ref, _ = _oracle(layer, x)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_dtype_is_kept(dtype):
    packed = _packed(32, 128, 32, sym=True, seed=11)
    layer = QuantLinear(packed, dtype)
    layer.use_cpu_int4("aten")
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref, tol = _oracle(QuantLinear(packed, torch.float32), x.float())
    out_round = (2.0**-11 if dtype == torch.float16 else U) * ref.abs()  # the cast back to x's dtype
    assert bool(((y.double() - ref).abs() <= tol + out_round).all())


def test_activation_quantized_layer_runs_the_op_on_quantized_inputs():
    packed = _packed(64, 256, 64, sym=False, seed=21)
    spec = ActSpec(8, "per-token", False)
    ref_layer = QuantLinear(packed, torch.float32)
    wrapped = ActQuantLinear(QuantLinear(packed, torch.float32), spec)
    assert use_cpu_int4(wrapped, "aten") == {} and wrapped.linear.uses_cpu_int4
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(22))
    ref, tol = _oracle(ref_layer, fake_quantize_activation(x, spec))
    assert bool(((wrapped(x).double() - ref).abs() <= tol).all())


def test_use_cpu_int4_reports_refused_layers():
    model = torch.nn.Sequential(QuantLinear(_packed(64, 128, 32, sym=True), torch.float32),
                                QuantLinear(_packed(40, 64, 32, sym=True), torch.float32))
    refused = use_cpu_int4(model, "aten")
    assert list(refused) == ["1"] and "out_features=40" in refused["1"]
    assert model[0].uses_cpu_int4 and not model[1].uses_cpu_int4
    assert "cpu_int4(group=32)" in repr(model[0])


def test_packed_model_loads_onto_the_op_at_half_a_byte_per_weight(tmp_path):
    """``load_packed_model`` on the CPU repacks every linear: no GPTQ tensors, no dense copy, and logits of
    the fake-quantized model within bf16 error."""
    from transformers import AutoModelForCausalLM
    from tritonq.engine.formats.registry import save_packed
    from tritonq.engine.runtime.serve import load_packed_model

    from .helpers import make_fake_dir

    fake = make_fake_dir(tmp_path / "fake", group_size=32, sym=False, act_order=True)
    packed = save_packed(fake, tmp_path / "ct", "gptq_v2")
    model, _ = load_packed_model(packed, "cpu", "float32")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.uses_cpu_int4 and m.qweight is None for m in layers)
    for m in layers:
        held = sum(b.numel() * b.element_size() for b in m.buffers())
        weights = m.in_features * m.out_features
        assert held <= weights * (0.5 + 4 / 32) + 8 * m.in_features  # codes, bf16 s and zf, the permutation
        assert "_dense" not in m.__dict__
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119]])
    ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want).norm() / want.norm()) < 2e-2
    assert float((got - want).abs().max()) > 0  # the op really ran (bf16), not the exact reference
