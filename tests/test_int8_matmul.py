"""W8A8 kernels (kernels/int8_matmul.py) in the Triton interpreter against their PyTorch references, and the
references against float64 transcriptions; shapes off the block sizes."""

import pytest
import torch
from tritonq import kernels
from tritonq.engine.activations import ActSpec, fake_quantize_activation
from tritonq.kernels import int8_matmul as im


def _x(m, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    x[0] = 0.0  # an all-zero token: finite scale, zero codes
    return x


@pytest.mark.parametrize("m,k", [(1, 40), (7, 1100), (33, 576)])
def test_per_token_quant_kernel_matches_reference_and_the_engine_grid(m, k):
    x = _x(m, k)
    q_ref, s_ref = im.quantize_per_token_ref(x)
    q, s = im.quantize_per_token_triton(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert torch.all(q[0] == 0) and q.dtype == torch.int8
    # dequantized codes are the engine's per-token symmetric 8-bit fake quantization
    torch.testing.assert_close(q.float() * s[:, None], fake_quantize_activation(x, ActSpec(8, "per-token", True)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("m,n,k", [(1, 24, 40), (70, 130, 100), (5, 64, 2000)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemm_kernel_matches_reference_and_float64(m, n, k, bias):
    gen = torch.Generator().manual_seed(m + n + k)
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    xs, ws = torch.rand(m, generator=gen) + 0.01, torch.rand(n, generator=gen) + 0.01
    b = torch.randn(n, generator=gen) if bias else None
    oracle = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double()[None, :]
    if b is not None:
        oracle = oracle + b.double()
    ref = im.int8_matmul_ref(xq, wq, xs, ws, b, torch.float32)
    torch.testing.assert_close(ref.double(), oracle, rtol=1e-6, atol=1e-6 * float(oracle.abs().max()))
    got = im.int8_matmul_triton(xq, wq, xs, ws, b, torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(oracle.abs().max()))


def test_w8a8_linear_dispatch_and_fake_quant_equivalence():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 48, generator=gen)
    wq = torch.randint(-128, 128, (20, 48), generator=gen, dtype=torch.int8)
    ws = torch.rand(20, generator=gen) * 0.01
    b = torch.randn(20, generator=gen)
    ref = kernels.w8a8_linear(x, wq, ws, b)  # CPU: the reference
    tri = kernels.w8a8_linear(x, wq, ws, b, force="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5)
    fake = torch.nn.functional.linear(fake_quantize_activation(x, ActSpec(8, "per-token", True)),
                                      wq.float() * ws[:, None], b)
    torch.testing.assert_close(ref, fake, rtol=1e-4, atol=1e-4)


def test_bench_matmul_w8a8_rows_in_the_interpreter():
    from tritonq.bench.matmul import _w8a8_interpreter_rows

    rows, ok = _w8a8_interpreter_rows(as_json=True)
    assert ok and len(rows) == 6 and all(r["max_abs_err"] < 1e-3 for r in rows)


def test_sm75_is_excluded_and_integer_mma_is_counted():
    from tritonq.kernels.aot import compile as aot

    config = im.GEMM_CONFIGS[0]
    assert im.excluded("sm_75", "fp16", config) and im.excluded("sm_90", "fp16", config) is None
    for op in ("IMMA.16832.S8.S8", "IGMMA.64x64x32.S8.S8", "UTCIMMA", "HMMA.16816.F32"):
        assert aot._SASS_MMA_RE.match(f"        /*0420*/                   {op} R24, R2, R4, R24 ;"), op
    assert not aot._SASS_MMA_RE.match("        /*0420*/                   IMAD R24, R2, R4, R24 ;")
