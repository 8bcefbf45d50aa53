"""int4 dequant-matmul: both Triton kernels (interpreted on the CPU) against the PyTorch reference.

Tolerances. The reference dequantizes and multiplies in fp32, then rounds to x's dtype. The kernels
accumulate in fp32 too, so fp16/bf16 outputs may differ by the final rounding (half an ulp of the
output, 2^-11 / 2^-8 relative) plus fp32 summation-order noise; the PER_K GEMM path also rounds each
dequantized weight to x's dtype before ``tl.dot`` (relative 2^-11 fp16, 2^-8 bf16 per product). We check
``|y - ref| <= atol + rtol * |ref|`` elementwise with rtol = 2^-9 (fp16) / 2^-6 (bf16) and atol =
rtol * scale_of_output (the rms of the reference, which absorbs cancellation in sums of ~K terms).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

import pytest  # noqa: E402
import torch  # noqa: E402
from tritonq.errors import TritonqError
from tritonq.kernels import dequant_matmul as dm
from tritonq.kernels.pack import pack_int4, unpack_int4

RTOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}


def _problem(M, K, N, group_size, dtype, sym, act_order, seed, bias=False, batch=()):
    g = torch.Generator().manual_seed(seed)
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    codes = torch.randint(0, 16, (K, N), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).to(dtype)
    zeros = None if sym else torch.randint(0, 16, (G, N), generator=g).to(dtype)
    g_idx = None
    if act_order:  # GPTQ act-order: groups formed in a permuted column order
        perm = torch.randperm(K, generator=g)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // gs).to(torch.int32)
    x = torch.randn(*batch, M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, pack_int4(codes), scales, zeros, g_idx, b


def _assert_close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    rtol = RTOL[dtype]
    yf, rf = y.float(), ref.float()
    atol = rtol * rf.pow(2).mean().sqrt().item()
    err = (yf - rf).abs()
    bound = atol + rtol * rf.abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst excess {(err - bound).max():.3g}"


CASES = [
    # (M, K, N, group_size)
    (1, 256, 96, 32),
    (3, 576, 40, 64),
    (5, 512, 136, 128),
    (17, 256, 72, 128),
    (1, 200, 48, -1),   # K not a multiple of 128 (or of 16), per channel
    (3, 576, 64, -1),
    (5, 200, 40, 40),   # a group size no BLOCK_K divides: the PER_K path
]


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("M,K,N,group_size", CASES)
@pytest.mark.parametrize("sym", [False, True])
def test_kernel_matches_reference_fp16(kernel, M, K, N, group_size, sym):
    x, qw, s, z, _, _ = _problem(M, K, N, group_size, torch.float16, sym, False, seed=M * 1000 + K + N)
    ref = dm.dequant_matmul_ref(x, qw, s, z, group_size=group_size)
    y = dm.dequant_matmul(x, qw, s, z, group_size=group_size, force="triton", kernel=kernel)
    _assert_close(y, ref, torch.float16)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("M,group_size", [(1, 32), (3, 64), (17, -1)])
def test_kernel_matches_reference_bf16(kernel, M, group_size):
    x, qw, s, z, _, b = _problem(M, 256, 80, group_size, torch.bfloat16, False, False, seed=M, bias=True)
    ref = dm.dequant_matmul_ref(x, qw, s, z, group_size=group_size, bias=b)
    y = dm.dequant_matmul(x, qw, s, z, group_size=group_size, bias=b, force="triton", kernel=kernel)
    _assert_close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("M,K,group_size,sym", [(1, 256, 32, False), (3, 576, 64, True), (17, 512, 128, False)])
def test_act_order_g_idx(kernel, M, K, group_size, sym):
    x, qw, s, z, g_idx, b = _problem(M, K, 56, group_size, torch.float16, sym, True, seed=K + M, bias=True)
    ref = dm.dequant_matmul_ref(x, qw, s, z, group_size=group_size, g_idx=g_idx, bias=b)
    # the reference itself must differ from the sequential grouping, or the test proves nothing
    seq = dm.dequant_matmul_ref(x, qw, s, z, group_size=group_size, bias=b)
    assert not torch.allclose(ref.float(), seq.float(), atol=1e-2)
    y = dm.dequant_matmul(x, qw, s, z, group_size=group_size, g_idx=g_idx, bias=b, force="triton", kernel=kernel)
    _assert_close(y, ref, torch.float16)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_split_k_and_bias(kernel, split_k):
    """Both output paths: direct store (one K split) and fp32 atomics (several); bias added once."""
    M, K, N, gs = 3, 512, 72, 64
    x, qw, s, z, _, b = _problem(M, K, N, gs, torch.float16, False, False, seed=split_k, bias=True)
    base = dm.pick_config(M, K, N, gs, kernel=kernel)
    plan = dm.Plan(base.kernel, base.config, split_k, base.per_k)
    assert dm.grid(plan, M, N, K)[1] == split_k == dm.k_split(plan, K)[0]
    y = dm.dequant_matmul_triton(x, qw, s, z, group_size=gs, bias=b, plan=plan)
    _assert_close(y, dm.dequant_matmul_ref(x, qw, s, z, group_size=gs, bias=b), torch.float16)


@pytest.mark.parametrize("sym", [False, True])
def test_gemm_large_tile_scales_b(sym):
    """The 128-row GEMM tile dequantizes B with its scales (SCALE_AFTER_DOT=0); M > 64 picks it."""
    M, K, N, gs = 130, 128, 136, 32
    x, qw, s, z, _, b = _problem(M, K, N, gs, torch.float16, sym, False, seed=11, bias=True)
    plan = dm.pick_config(M, K, N, gs)
    assert plan.kernel == "gemm" and plan.config.constexprs()["SCALE_AFTER_DOT"] == 0
    y = dm.dequant_matmul_triton(x, qw, s, z, group_size=gs, bias=b, plan=plan)
    _assert_close(y, dm.dequant_matmul_ref(x, qw, s, z, group_size=gs, bias=b), torch.float16)


def test_batched_input_and_dispatch():
    x, qw, s, z, _, _ = _problem(3, 256, 64, 128, torch.float16, False, False, seed=7, batch=(2,))
    ref = dm.dequant_matmul_ref(x, qw, s, z, group_size=128)
    assert ref.shape == (2, 3, 64)
    _assert_close(dm.dequant_matmul(x, qw, s, z, group_size=128, force="triton", kernel="gemv"), ref, torch.float16)
    # force="triton" without a kernel: the dispatcher's choice (6 rows: the GEMV)
    _assert_close(dm.dequant_matmul(x, qw, s, z, group_size=128, force="triton"), ref, torch.float16)
    # CPU tensors without force take the reference; fp32 input is accepted there
    assert torch.equal(dm.dequant_matmul(x, qw, s, z, group_size=128), ref)
    y32 = dm.dequant_matmul(x.float(), qw, s, z, group_size=128)
    assert y32.dtype == torch.float32


def test_dequantize_matches_formula():
    x, qw, s, z, _, _ = _problem(1, 64, 16, 32, torch.float16, False, False, seed=3)
    q = unpack_int4(qw).float()
    w = dm.dequantize_int4(qw, s, z, 32)
    k = 37
    assert torch.allclose(w[k], s[k // 32].float() * (q[k] - z[k // 32].float()))


def test_pick_config_fills_h100_on_llama_shape():
    """Issue 6: at M=1 on 4096 x 14336 the GEMV grid fills 132 SMs at the target occupancy."""
    plan = dm.pick_config(1, 4096, 14336, 128, torch.float16, num_sms=132)
    assert plan.kernel == "gemv" and not plan.per_k
    gx, gy, gz = dm.grid(plan, 1, 14336, 4096)
    assert gx * gy * gz >= 132 * dm.GEMV_CTAS_PER_SM
    for M in (1, 2, 4, 8, 16, 64, 256):
        for K, N in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)):
            for gs in (32, 64, 128, -1):
                p = dm.pick_config(M, K, N, gs, torch.float16)
                assert p.config in (dm.GEMV_CONFIGS if p.kernel == "gemv" else dm.GEMM_CONFIGS)
                assert not p.per_k
    assert dm.pick_config(64, 4096, 4096, 128, torch.bfloat16, capability=(7, 5)).kernel == "gemv"


def test_aot_signature_names_every_kernel_argument():
    import inspect

    for cfg in dm.CONFIGS:
        kernel = dm.KERNELS[dm.kernel_for(cfg)]
        sig, consts = dm.aot_signature("fp16", cfg)
        assert list(sig) == list(inspect.signature(kernel.fn).parameters)
        assert all(sig[k] == "constexpr" for k in consts)
        assert set(dm.aot_attrs(sig)) <= {(i,) for i in range(len(sig))}


# ---------------------------------------------------------------------------------------------- pack


@pytest.mark.parametrize("K,N", [(8, 1), (64, 24), (200, 40)])
def test_pack_round_trip(K, N):
    codes = torch.randint(0, 16, (K, N), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.shape == (K // 8, N)
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_layout_is_gptq():
    codes = torch.zeros(8, 2, dtype=torch.int64)
    codes[:, 0] = torch.arange(8)
    codes[7, 1] = 15  # the top nibble sets the sign bit of the int32 word
    packed = pack_int4(codes)
    assert packed[0, 0].item() == 0x76543210
    assert packed[0, 1].item() == -(1 << 28)  # 0xF0000000 as int32


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_problem():
    x, qw, s, z, _, _ = _problem(2, 64, 16, 32, torch.float16, False, False, seed=0)
    with pytest.raises(TritonqError, match="multiple of 8"):
        pack_int4(torch.zeros(12, 4, dtype=torch.int32))
    with pytest.raises(TritonqError, match="0..15"):
        pack_int4(torch.full((8, 4), 16))
    with pytest.raises(TritonqError, match="multiple of 8"):
        dm.dequant_matmul(torch.zeros(2, 60, dtype=torch.float16), qw, s, z, group_size=32)
    with pytest.raises(TritonqError, match="packed rows"):
        dm.dequant_matmul(torch.zeros(2, 72, dtype=torch.float16), qw, s, z, group_size=32)
    with pytest.raises(TritonqError, match="scales must be"):
        dm.dequant_matmul(x, qw, s[:1], z, group_size=32)
    with pytest.raises(TritonqError, match="zeros must"):
        dm.dequant_matmul(x, qw, s, z[:, :8], group_size=32)
    with pytest.raises(TritonqError, match="does not divide"):
        dm.dequant_matmul(x, qw, s, z, group_size=24)
    with pytest.raises(TritonqError, match="qweight must be int32"):
        dm.dequant_matmul(x, qw.to(torch.int64), s, z, group_size=32)
    with pytest.raises(TritonqError, match="bias"):
        dm.dequant_matmul(x, qw, s, z, group_size=32, bias=torch.zeros(3))
    with pytest.raises(TritonqError, match="g_idx"):
        dm.dequant_matmul(x, qw, s, z, group_size=32, g_idx=torch.zeros(5, dtype=torch.int32))
    with pytest.raises(TritonqError, match="force"):
        dm.dequant_matmul(x, qw, s, z, group_size=32, force="gemv")  # a kernel choice is not a force value
    with pytest.raises(TritonqError, match="kernel must be one of"):
        dm.dequant_matmul(x, qw, s, z, group_size=32, force="triton", kernel="triton")
    with pytest.raises(TritonqError, match="fp16 or bf16 activations"):
        dm.dequant_matmul(x.float(), qw, s, z, group_size=32, force="triton", kernel="gemv")
    with pytest.raises(TritonqError, match="group_size must be"):
        dm.dequant_matmul(x, qw, s, z, group_size=0)
