"""Every quantization kernel in the Triton interpreter against its PyTorch reference, and the reference
against float64, on fresh random inputs with stated tolerances (shapes not multiples of the blocks)."""

import pytest
import torch
from tritonq import kernels
from tritonq.kernels import gptq_block

# fp32 accumulation over <= 200 tokens: relative error ~1e-6; 1e-5 leaves room for summation order.
HESSIAN_RTOL = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,width", [(37, 70), (64, 130), (5, 33)])
def test_hessian_kernel_matches_float64(dtype, tokens, width):
    torch.manual_seed(tokens + width)
    hessian_ref = torch.zeros(width, width)
    hessian_tri = torch.zeros(width, width)
    h64 = torch.zeros(width, width, dtype=torch.float64)
    n_ref = n_tri = 0
    seen = []
    for batch in range(3):  # running mean over several batches of different sizes
        x = (torch.randn(tokens + batch, width) * (1 + torch.rand(width))).to(dtype)
        seen.append(x.double())
        n_ref = kernels.hessian_accumulate(hessian_ref, x, n_ref, force="ref")
        n_tri = kernels.hessian_accumulate(hessian_tri, x, n_tri, force="triton")
    xs = torch.cat(seen)
    h64 = 2.0 / xs.shape[0] * xs.t() @ xs
    assert n_ref == n_tri == xs.shape[0]
    scale = h64.abs().max()
    assert (hessian_tri.double() - h64).abs().max() / scale < HESSIAN_RTOL
    assert (hessian_ref.double() - h64).abs().max() / scale < HESSIAN_RTOL
    # off-diagonal tiles are mirrored exactly; diagonal tiles are symmetric up to summation order
    assert (hessian_tri - hessian_tri.t()).abs().max() / scale < 1e-6


def _factor(k, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, 3 * k, generator=gen)
    h = a @ a.t() / k + 0.05 * torch.eye(k)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("fit", [True, False])
@pytest.mark.parametrize("n,k,c0,ncols,group", [(37, 100, 0, 50, 25), (20, 160, 64, 64, 32), (9, 40, 32, 8, 8)])
def test_gptq_block_kernel_matches_reference(sym, fit, n, k, c0, ncols, group):
    torch.manual_seed(n * k + c0)
    w = torch.randn(n, k)
    u = _factor(k, seed=k)
    groups = k // group
    g_idx = (torch.arange(k) // group).to(torch.int32)
    if not fit:  # preset grids read through a non-trivial g_idx
        g_idx = g_idx[torch.randperm(k)]
    scale = torch.rand(n, groups) * 0.2 + 0.05
    zero = torch.randint(0, 16, (n, groups)).float()
    s_ref, z_ref, s_tri, z_tri = scale.clone(), zero.clone(), scale.clone(), zero.clone()
    q_ref, e_ref = gptq_block.quantize_block_ref(w, u, c0, ncols, s_ref, z_ref, g_idx, group, 15, sym, fit)
    q_tri, e_tri = gptq_block.quantize_block_triton(w, u, c0, ncols, s_tri, z_tri, g_idx, group, 15, sym, fit)
    # same operations in the same order (IEEE division, round-half-even): equal up to fma contraction
    assert torch.allclose(q_tri, q_ref, rtol=0, atol=1e-5)
    assert torch.allclose(e_tri, e_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(s_tri, s_ref) and torch.equal(z_tri, z_ref)


def test_gptq_block_reference_matches_float64_column_loop():
    """The in-block reference is Algorithm 1 of GPTQ; check it against a float64 transcription."""
    torch.manual_seed(7)
    n, k, group = 12, 48, 16
    w = torch.randn(n, k)
    u = _factor(k, seed=3)
    scale = torch.zeros(n, k // group)
    zero = torch.zeros_like(scale)
    g_idx = (torch.arange(k) // group).to(torch.int32)
    q, err = gptq_block.quantize_block_ref(w, u, 0, k, scale, zero, g_idx, group, 7, False, True)
    w64, u64 = w.double().clone(), u.double()
    for j in range(k):
        g = j // group
        qj = scale[:, g].double() * (torch.clamp(torch.round(w64[:, j] / scale[:, g].double()) + zero[:, g], 0, 7)
                                     - zero[:, g])
        e = (w64[:, j] - qj) / u64[j, j]
        w64[:, j + 1:] -= e[:, None] * u64[j, j + 1:][None, :]
        assert torch.allclose(q[:, j].double(), qj, atol=1e-4)
        assert torch.allclose(err[:, j].double(), e, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("m,n,k", [(37, 45, 20), (64, 130, 96), (1, 7, 3)])
def test_trailing_update_kernel(m, n, k):
    torch.manual_seed(m + n + k)
    c = torch.randn(m, n + 5)[:, 5:]  # a strided view, as in the engine
    a = torch.randn(k, m).t()  # the transposed error buffer the block kernel returns
    b = torch.randn(k, n)
    expect = c.double() - a.double() @ b.double()
    c_tri = c.clone()
    kernels.trailing_update(c_tri, a, b, force="triton")
    assert torch.allclose(c_tri.double(), expect, atol=1e-4, rtol=1e-5)
