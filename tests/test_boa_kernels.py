"""BoA's kernels (kernels/boa_rows.py; the batched trailing update of kernels/gptq_block.py) in the Triton
interpreter against their PyTorch references, and the references against a float64 row-by-row
transcription; shapes that are not multiples of the blocks (heads, rows, columns) included."""

import pytest
import torch
from tritonq import kernels
from tritonq.engine.grid import GridSpec, fit_groups
from tritonq.engine.methods.boa import BoAOptions, boa_solve
from tritonq.errors import TritonqError


def _problem(heads, rows, k, group, bits=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(heads, rows, k, generator=gen)
    x = torch.randn(3 * k, k, generator=gen) * (0.3 + 2 * torch.rand(k, generator=gen))
    h = x.t() @ x / (3 * k) + 0.05 * torch.eye(k)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).contiguous()
    y = torch.randn(heads, 4 * rows, rows, generator=gen)
    hr = y.transpose(1, 2) @ y / (4 * rows) + 0.05 * torch.eye(rows)
    ur = torch.stack([torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(m)), upper=True) for m in hr])
    coef = (ur / torch.diagonal(ur, dim1=1, dim2=2)[..., None]).contiguous()
    spec = GridSpec(bits=bits, group_size=group)
    s, z = fit_groups(w.reshape(heads * rows, k), spec)
    groups = s.shape[1]
    g_idx = (torch.arange(k) // spec.effective_group(k)).to(torch.int32)
    return w, u, coef, s.reshape(heads, rows, groups).contiguous(), z.reshape(heads, rows, groups).contiguous(), \
        g_idx, spec


def _rows64(w, u, coef, scale, zero, g_idx, r0, nrows, maxq):
    """Float64, one column at a time: GPTQ per row (Alg. 1, B = 1), then the residual to the block's rows."""
    w = w.double().clone()
    u, coef = u.double(), coef.double()
    heads, _, k = w.shape
    q = torch.zeros(heads, nrows, k, dtype=torch.float64)
    delta = torch.zeros_like(q)
    idx = g_idx.long()
    for ii in range(nrows):
        i = r0 + ii
        row = w[:, i].clone()
        s, z = scale[:, i][:, idx].double(), zero[:, i][:, idx].double()
        for j in range(k):
            q[:, ii, j] = s[:, j] * (torch.clamp(torch.round(row[:, j] / s[:, j]) + z[:, j], 0, maxq) - z[:, j])
            row[:, j + 1:] -= ((row[:, j] - q[:, ii, j]) / u[j, j])[:, None] * u[j, j + 1:][None, :]
        delta[:, ii] = w[:, i] - q[:, ii]
        w[:, i + 1:r0 + nrows] -= coef[:, i, i + 1:r0 + nrows, None] * delta[:, ii, None, :]
    return q, delta, w


@pytest.mark.parametrize("heads,rows,k,group,r0,nrows", [
    (3, 8, 48, 16, 0, 8), (2, 10, 200, -1, 3, 5), (17, 4, 130, 10, 1, 3), (5, 6, 257, -1, 0, 6),
])
def test_row_sweep_kernel_matches_reference(heads, rows, k, group, r0, nrows):
    w, u, coef, s, z, g_idx, spec = _problem(heads, rows, k, group, seed=heads + k)
    w_ref, w_tri = w.clone(), w.clone()
    q_ref, d_ref = kernels.boa_sweep_rows(w_ref, u, coef, s, z, g_idx, r0, nrows, spec.effective_group(k),
                                          spec.maxq, spec.sym, force="ref")
    q_tri, d_tri = kernels.boa_sweep_rows(w_tri, u, coef, s, z, g_idx, r0, nrows, spec.effective_group(k),
                                          spec.maxq, spec.sym, force="triton")
    # fp32 in a different summation order: a rounding near a midpoint may flip, the rest agrees closely
    assert (q_tri - q_ref).abs().gt(1e-4).float().mean() < 0.01
    assert (d_tri - d_ref).abs().gt(1e-3).float().mean() < 0.01
    # the block's rows are scratch after the call (q and delta are the results); the other rows are untouched
    outside = torch.ones(rows, dtype=torch.bool)
    outside[r0:r0 + nrows] = False
    assert torch.equal(w_ref[:, outside], w[:, outside]) and torch.equal(w_tri[:, outside], w[:, outside])


@pytest.mark.parametrize("k,group", [(48, 16), (150, -1)])
def test_row_sweep_reference_matches_float64_transcription(k, group):
    w, u, coef, s, z, g_idx, spec = _problem(3, 6, k, group, seed=k)
    w32 = w.clone()
    q, delta = kernels.boa_sweep_rows(w32, u, coef, s, z, g_idx, 1, 5, spec.effective_group(k), spec.maxq,
                                      spec.sym, force="ref")
    q64, d64, w64 = _rows64(w, u, coef, s, z, g_idx, 1, 5, spec.maxq)
    assert (q.double() - q64).abs().gt(1e-4).float().mean() < 0.01
    assert (delta.double() - d64).abs().gt(1e-3).float().mean() < 0.02
    codes = q / s[:, 1:6][..., g_idx.long()] + z[:, 1:6][..., g_idx.long()]
    assert torch.allclose(codes, codes.round(), atol=1e-3)


@pytest.mark.parametrize("heads,m,n,k", [(3, 40, 70, 5), (1, 16, 64, 16), (4, 7, 129, 33)])
def test_cross_update_kernel_matches_reference(heads, m, n, k):
    gen = torch.Generator().manual_seed(m + n)
    c = torch.randn(heads, m, n, generator=gen)
    coef = torch.randn(heads, k, m, generator=gen)
    b = torch.randn(heads, k, n, generator=gen)
    c_ref, c_tri = c.clone(), c.clone()
    kernels.trailing_update(c_ref, coef.transpose(1, 2), b, force="ref")  # the engine's transposed view
    kernels.trailing_update(c_tri, coef.transpose(1, 2), b, force="triton")
    torch.testing.assert_close(c_tri, c_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(c_ref.double(), c.double() - coef.double().transpose(1, 2) @ b.double(),
                               rtol=1e-5, atol=1e-4)


def test_triton_solve_matches_reference_solve():
    w, _, _, _, _, _, _ = _problem(5, 20, 72, 24, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 72, generator=gen)
    h_col = x.t() @ x / 300
    y = torch.randn(5, 100, 20, generator=gen)
    h_row = y.transpose(1, 2) @ y / 100
    spec = GridSpec(bits=3, group_size=24)
    opts = BoAOptions(act_order_col=True, act_order_row=True)
    ref = boa_solve(w, h_col, h_row, spec, opts, "layer", force="ref")
    tri = boa_solve(w, h_col, h_row, spec, opts, "layer", force="triton")
    assert (tri.weight - ref.weight).abs().gt(1e-4).float().mean() < 0.01
    assert tri.loss == pytest.approx(ref.loss, rel=0.02)


def test_bad_arguments_are_clear_errors():
    w, u, coef, s, z, g_idx, spec = _problem(2, 4, 32, 16)
    with pytest.raises(TritonqError, match="not inside"):
        kernels.boa_sweep_rows(w, u, coef, s, z, g_idx, 2, 3, 16, spec.maxq, False, force="ref")
    with pytest.raises(TritonqError, match="fp32"):
        kernels.boa_sweep_rows(w.double(), u, coef, s, z, g_idx, 0, 4, 16, spec.maxq, False, force="triton")
    with pytest.raises(TritonqError, match="takes C"):
        kernels.trailing_update(w, coef[:, :3], w, force="ref")


def test_bench_boa_row_runs_the_kernel_and_agrees():
    from tritonq.bench import quant_time

    rows = quant_time.bench_boa(torch.device("cpu"), quant_time.CPU_SHAPES["boa"], "triton")
    assert rows and rows[0]["op"] == "boa_sweep" and rows[0]["frac_weights_differing"] < 0.01
