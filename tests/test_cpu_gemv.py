"""tritonq's CPU decode op (``kernels/cpu_gemv.cpp``) against its float64 reference, and ``QuantLinear`` on it.

Oracle: ``x^ @ W^T + b`` in float64, where ``x^`` is the activations quantized per row and block of 32 exactly
as the op does it (:func:`quantize_x_ref`) and ``W = scale * q + min`` with the fp16 scale and min the op
reads. The op's integer sums are exact; each block sum is rounded once to float32 when scaled, and each
group adds two rounded fused multiply-adds, so per output element

    |y - ref| <= (blocks + 2 * groups + 2) * 2^-24 * sum_k |x^_k| |W_nk|  (+ the same on |b|).

A negative control (the min's sign flipped) must break that bound. The SIMD and portable builds must agree
bit for bit, a row must come out the same whatever else is in the batch and whatever the thread count, and
the tiles of up to 8 rows must cover ragged M.
"""

from __future__ import annotations

import pytest
import torch
from tritonq.engine.formats.records import PackedLinear
from tritonq.engine.runtime.qlinear import QuantLinear, use_cpu_int4
from tritonq.errors import TritonqError
from tritonq.kernels import cpu_gemv
from tritonq.kernels.pack import pack_int4

pytestmark = pytest.mark.skipif(cpu_gemv.extension() is None, reason="the C++ extension did not build")

EPS = 2.0**-24


def _int4(n: int, k: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = torch.rand(k // group, n, generator=gen) * 0.05 + 0.002
    minv = -scale * torch.randint(0, 16, (k // group, n), generator=gen).float()
    return codes, scale, minv


def _bound(x: torch.Tensor, w_abs: torch.Tensor, k: int, group: int, bias: torch.Tensor | None) -> torch.Tensor:
    mag = cpu_gemv.quantize_x_ref(x).abs() @ w_abs.t()
    tol = (k // 32 + 2 * (k // group) + 2) * EPS * mag + 1e-30
    return tol if bias is None else tol + 2 * EPS * bias.double().abs()


@pytest.mark.parametrize(("n", "k", "group"), [(16, 32, 32), (48, 96, 32), (80, 256, 64), (32, 384, 128),
                                               (64, 512, 512)])
@pytest.mark.parametrize("m", [1, 3, 8, 11])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_matches_float64_reference(n, k, group, m, bias):
    seed = n * 7 + k + group + m
    codes, scale, minv = _int4(n, k, group, seed)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)) * 3
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 2)) if bias else None
    y = cpu_gemv.int4_gemm(x, w, s, mn, group, b)
    ref = cpu_gemv.int4_gemm_ref(x, w, s, mn, group, b)
    dense = cpu_gemv.unpack_int4_rows(w, s, mn, group)
    expected = codes.double() * s_dense(scale, group) + s_dense(minv, group)
    assert torch.equal(dense, expected)  # the layout round-trips the fp16 scale and min
    tol = _bound(x, dense.abs(), k, group, b)
    assert y.dtype == torch.float32 and bool(((y.double() - ref).abs() <= tol).all())
    assert float((y.double() - ref).abs().max()) > 0 or m * n < 64  # float32, not a float64 shortcut


def s_dense(t: torch.Tensor, group: int) -> torch.Tensor:
    """A [G, N] per-group tensor, rounded to fp16 as the layout stores it, expanded to [N, K]."""
    return t.half().double().repeat_interleave(group, dim=0).t()


def test_flipped_min_breaks_the_bound():
    codes, scale, minv = _int4(64, 256, 64, 5)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 64)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(6))
    ref = cpu_gemv.int4_gemm_ref(x, w, s, mn, 64)
    wrong = cpu_gemv.int4_gemm(x, w, s, -mn, 64)
    tol = _bound(x, cpu_gemv.unpack_int4_rows(w, s, mn, 64).abs(), 256, 64, None)
    assert bool(((wrong.double() - ref).abs() > tol).any())


@pytest.mark.parametrize("m", [1, 5, 9, 17])
def test_int8_matches_float64_reference(m):
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(-128, 128, (48, 192), generator=gen)
    scale = torch.rand(48, generator=gen) * 0.01
    b = torch.randn(48, generator=gen)
    w = cpu_gemv.pack_int8_rows(codes)
    x = torch.randn(m, 192, generator=gen)
    y = cpu_gemv.int8_gemm(x, w, scale, b)
    ref = cpu_gemv.int8_gemm_ref(x, w, scale, b)
    dense = codes.double() * scale.double()[:, None]
    # the layout round-trips (an identity row quantizes to 127 * fl32(1/127): 1 up to float32 rounding)
    torch.testing.assert_close(cpu_gemv.int8_gemm_ref(torch.eye(192), w, scale), dense.t(), rtol=1e-7, atol=0)
    assert bool(((y.double() - ref).abs() <= _bound(x, dense.abs(), 192, 192, b)).all())


def test_simd_and_portable_builds_agree_bit_for_bit():
    portable = cpu_gemv.extension(portable=True)
    if portable is None:
        pytest.skip(f"the portable build failed: {cpu_gemv.unavailable_reason(True)}")
    codes, scale, minv = _int4(96, 320, 32, 9)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 32)
    x = torch.randn(10, 320, generator=torch.Generator().manual_seed(10))
    b = torch.randn(96)
    assert torch.equal(cpu_gemv.int4_gemm(x, w, s, mn, 32, b), cpu_gemv.int4_gemm(x, w, s, mn, 32, b, portable=True))
    w8 = cpu_gemv.pack_int8_rows(torch.randint(-128, 128, (96, 320)))
    sc = torch.rand(96)
    assert torch.equal(cpu_gemv.int8_gemm(x, w8, sc, b), cpu_gemv.int8_gemm(x, w8, sc, b, portable=True))


def test_rows_are_batch_and_thread_invariant():
    codes, scale, minv = _int4(2048, 1024, 64, 12)  # 128 row blocks: several chunks per thread
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 64)
    x = torch.randn(13, 1024, generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = cpu_gemv.int4_gemm(x, w, s, mn, 64)
        torch.set_num_threads(1)
        alone = torch.cat([cpu_gemv.int4_gemm(x[i:i + 1], w, s, mn, 64) for i in range(13)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, alone)


def test_unsupported_shapes_are_named():
    assert "out_features=40" in cpu_gemv.supports(64, 40, 32)
    assert "in_features=48" in cpu_gemv.supports(48, 64, 48)
    assert "group_size=48" in cpu_gemv.supports(96, 64, 48)
    with pytest.raises(TritonqError, match="out_features=40"):
        cpu_gemv.pack_int4_rows(torch.zeros(40, 64, dtype=torch.uint8), torch.ones(2, 40), torch.ones(2, 40), 32)
    codes, scale, minv = _int4(16, 64, 32, 1)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 32)
    with pytest.raises(TritonqError, match="expects 64"):
        cpu_gemv.int4_gemm(torch.randn(1, 32), w, s, mn, 32)


def _packed(n: int, k: int, gs: int, *, sym: bool, act_order: bool, seed: int) -> PackedLinear:
    gen = torch.Generator().manual_seed(seed)
    g_eff = k if gs == -1 else gs
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // g_eff, n, generator=gen) * 0.05 + 0.002).half().float()
    zeros = None if sym else torch.randint(0, 16, (k // g_eff, n), generator=gen).float()
    g_idx = None
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // g_eff).to(torch.int32)
    return PackedLinear(pack_int4(codes), scales, zeros, g_idx, gs, k, n, torch.randn(n, generator=gen))


@pytest.mark.parametrize(("gs", "sym", "act_order"), [(32, False, False), (64, True, True), (-1, False, False),
                                                      (128, False, True)])
def test_quantlinear_runs_the_op_on_the_stored_grid(gs, sym, act_order):
    """The repacked layer computes the checkpoint's ``s * (q - z)`` (fp16 scale and min) on quantized inputs,
    act-order through the input permutation, per channel as one group of K."""
    packed = _packed(96, 256, gs, sym=sym, act_order=act_order, seed=gs + 3)
    ref_layer = QuantLinear(packed, torch.float32)
    layer = QuantLinear(packed, torch.float32)
    assert layer.use_cpu_int4("tritonq") and layer.cpu_kernel == "tritonq" and layer.qweight is None
    exact = ref_layer.dequantized_weight().double()  # [N, K] from the stored scales
    # fp16 scale and min (= -scale * zero): each within 2^-11 relative, |scale * q| and |min| <= 16 * max scale
    assert torch.allclose(layer.dequantized_weight().double(), exact, rtol=0, atol=2.0**-10 * 16 * 0.052)
    assert not torch.allclose(layer.dequantized_weight().double(), -exact, rtol=0, atol=2.0**-10 * 16 * 0.052)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(gs + 4))
    order = slice(None) if layer.input_order is None else layer.input_order  # the op sees inputs in group order
    xq = cpu_gemv.quantize_x_ref(x[:, order])
    ref = xq @ layer.dequantized_weight().double()[:, order].t() + packed.bias.double()
    mag = xq.abs() @ exact[:, order].abs().t() * 2
    y = layer(x)
    g = 256 if gs == -1 else gs
    assert bool(((y.double() - ref).abs() <= (256 // 32 + 2 * 256 // g + 4) * EPS * (mag + ref.abs())).all())
    assert "on tritonq" in repr(layer)


def test_layouts_no_op_takes_keep_the_reference_path():
    model = torch.nn.Sequential(QuantLinear(_packed(64, 256, 64, sym=False, act_order=False, seed=1), torch.float32),
                                QuantLinear(_packed(64, 272, 16, sym=False, act_order=False, seed=2), torch.float32))
    refused = use_cpu_int4(model)
    assert list(refused) == ["1"] and "group_size=16" in refused["1"]
    assert model[0].cpu_kernel == "tritonq" and model[1].cpu_kernel is None and model[1].qweight is not None
    with pytest.raises(TritonqError, match="kernel must be one of"):
        model[1].use_cpu_int4("fast")


@pytest.mark.parametrize(("n", "k", "m"), [(16, 4, 1), (48, 96, 3), (64, 200, 9)])
def test_f16_matches_its_arithmetic_and_float64(n, k, m):
    """The fp16 head op against the same float32 arithmetic emulated in PyTorch (fp16 weights, four fused
    partial sums per row: one rounding per step) within two float32 roundings of each partial sum, and against
    float64 within K roundings."""
    gen = torch.Generator().manual_seed(n + k + m)
    weight = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    w = cpu_gemv.pack_f16_rows(weight)
    y = cpu_gemv.f16_gemm(x, w, b)
    w16 = weight.half().double()
    mag = x.double().abs() @ w16.abs().t()
    emulated = cpu_gemv.f16_gemm_ref(x, w, b)
    assert bool(((y.double() - emulated.double()).abs() <= 8 * EPS * (mag + b.double().abs())).all())
    exact = x.double() @ w16.t() + b.double()
    assert bool(((y.double() - exact).abs() <= (k + 4) * EPS * (mag + b.double().abs())).all())
    assert not torch.allclose(y.double(), x.double() @ weight.double().t() * 1.001 + b.double(), rtol=1e-6)
    alone = torch.cat([cpu_gemv.f16_gemm(x[i:i + 1], w, b) for i in range(m)])
    assert torch.equal(y, alone)
    portable = cpu_gemv.extension(portable=True)
    if portable is not None:
        assert torch.equal(y, cpu_gemv.f16_gemm(x, w, b, portable=True))


def test_use_cpu_head_puts_a_tied_head_on_the_fp16_op():
    """A tied Llama head becomes an ``F16Linear`` (the embeddings keep their float table); the logits move by
    the fp16 rounding of the head only; a head the op cannot take is left alone with the reason."""
    from helpers import tiny_config
    from transformers import AutoModelForCausalLM
    from tritonq.engine.runtime.cpu_head import F16Linear, use_cpu_head

    torch.manual_seed(0)
    config = tiny_config(vocab_size=272, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(input_ids=ids).logits.double()
        table = model.get_input_embeddings().weight.detach().clone()
        assert use_cpu_head(model) is None
        got = model(input_ids=ids).logits.double()
    head = model.get_output_embeddings()
    assert isinstance(head, F16Linear) and torch.equal(model.get_input_embeddings().weight, table)
    assert torch.equal(head.dequantized_weight(), table.half().float())
    err = (got - want).abs().max() / want.abs().max()
    assert 0 < float(err) < 2.0**-9
    odd = torch.nn.Module()
    odd.get_output_embeddings = lambda: torch.nn.Linear(8, 20)
    assert "not a multiple" in use_cpu_head(odd)


def test_fused_q_k_v_and_gate_up_give_bit_identical_logits(tmp_path):
    """A packed model with q/k/v and gate/up fused into one op call each computes exactly what it computes
    unfused (the op's rows are independent), in a batch and step by step with a KV cache."""
    from transformers import DynamicCache
    from tritonq.engine.formats.registry import save_packed
    from tritonq.engine.runtime.cpu_head import use_cpu_head
    from tritonq.engine.runtime.fused import FusedMember
    from tritonq.engine.runtime.serve import load_packed_model

    from .helpers import make_fake_dir

    fake = make_fake_dir(tmp_path / "fake", group_size=32, sym=False)
    packed = save_packed(fake, tmp_path / "ct", "compressed-tensors")
    model, _ = load_packed_model(packed, "cpu", "float32")  # fused on load
    unfused, _ = load_packed_model(packed, "cpu", "float32", cpu_int4=False)
    assert use_cpu_int4(unfused) == {} and "not a multiple" in use_cpu_head(unfused)  # vocabulary 259: float
    attn = model.model.layers[0].self_attn
    assert all(isinstance(getattr(attn, n), FusedMember) for n in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(model.model.layers[0].mlp.up_proj, FusedMember)
    assert isinstance(unfused.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119], [256, 87, 111, 114, 108, 100, 33, 10]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, unfused(input_ids=ids).logits)
        caches = [DynamicCache(config=m.config) for m in (model, unfused)]
        for step in range(ids.shape[1]):
            a, b = (m(input_ids=ids[:, step:step + 1], past_key_values=c, use_cache=True).logits
                    for m, c in zip((model, unfused), caches))
            assert torch.equal(a, b)


def test_decode_threads_split_torch_and_the_pool_and_restore_both():
    """While decoding, torch runs on one thread and the pool on torch's count; both come back afterwards, and
    the pool's thread count never changes a result."""
    from tritonq.engine.runtime.serve import decode_threads

    codes, scale, minv = _int4(512, 256, 64, 21)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 64)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(22))
    before = torch.get_num_threads()
    model = torch.nn.Linear(2, 2)
    model.device = torch.device("cpu")
    try:
        torch.set_num_threads(2)
        want = cpu_gemv.int4_gemm(x, w, s, mn, 64)
        with decode_threads(model):
            assert torch.get_num_threads() == 1
            assert cpu_gemv.set_threads(2) == 2  # the pool was set to torch's count
            got = cpu_gemv.int4_gemm(x, w, s, mn, 64)
        assert torch.get_num_threads() == 2 and cpu_gemv.set_threads(0) == 0
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_int8_linear_runs_the_int8_op_where_the_shape_fits():
    """An int8 head (``--quantize-head int8``) on the CPU op: its own codes and scales, int8 activations; a
    shape the op cannot take falls back to PyTorch's int8 op."""
    from tritonq.engine.formats.records import PackedInt8Linear
    from tritonq.engine.runtime.qlinear import Int8Linear

    gen = torch.Generator().manual_seed(31)
    codes = torch.randint(-127, 128, (48, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(48, generator=gen) * 0.01
    layer = Int8Linear(PackedInt8Linear(codes, scale, 64, 48), torch.float32)
    assert layer.use_cpu_op() and layer.kernel == "cpu_gemv"
    x = torch.randn(3, 64, generator=gen)
    ref = cpu_gemv.int8_gemm_ref(x, layer.rows_weight, scale)
    mag = cpu_gemv.quantize_x_ref(x).abs() @ (codes.double().abs() * scale.double()[:, None]).t()
    assert bool(((layer(x).double() - ref).abs() <= 6 * EPS * mag).all())
    odd = Int8Linear(PackedInt8Linear(codes[:40], scale[:40], 64, 40), torch.float32)
    assert odd.use_cpu_op() and odd.kernel == "cpu_bf16"


def test_prompts_run_a_float32_gemm_on_the_stored_grid():
    """Above ``GEMM_ROWS`` rows the int4 linear multiplies the dequantized float32 weight (no int8 activations):
    a prompt or an evaluation window scores the stored grid; up to it, the op runs."""
    codes, scale, minv = _int4(64, 256, 64, 41)
    w, s, mn = cpu_gemv.pack_int4_rows(codes, scale, minv, 64)
    dense = cpu_gemv.dequantize_int4_rows(w, s, mn, 64)
    assert torch.equal(dense.double(), cpu_gemv.unpack_int4_rows(w, s, mn, 64))
    x = torch.randn(cpu_gemv.GEMM_ROWS + 5, 256, generator=torch.Generator().manual_seed(42))
    b = torch.randn(64)
    exact = x.double() @ dense.double().t() + b.double()
    long = cpu_gemv.int4_linear(x, w, s, mn, 64, b)
    assert float((long.double() - exact).abs().max()) < 1e-4 * float(exact.abs().max())
    short = cpu_gemv.int4_linear(x[:3], w, s, mn, 64, b)
    assert torch.equal(short, cpu_gemv.int4_gemm(x[:3], w, s, mn, 64, b))
    assert float((short.double() - exact[:3]).abs().max()) > float((long[:3].double() - exact[:3]).abs().max())
