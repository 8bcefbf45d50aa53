"""What keeps a block's peak memory down without moving a number: the Hessian handed over to the solve, the
factorisation from a reversed matrix, and activations paged out to disk."""

from __future__ import annotations

import torch
from tritonq.engine.cache import ActivationCache
from tritonq.engine.grid import GridSpec
from tritonq.engine.hessian import HessianAccumulator, inverse_cholesky, inverse_cholesky_reversed
from tritonq.engine.memory_peak import peak_memory, release_free_memory, reset_peak_memory
from tritonq.engine.methods.gptq import GPTQOptions, solve


def _hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) * torch.rand(k, generator=g)
    return (2 * x.T @ x / x.shape[0]).float()


def test_reversed_factorisation_is_the_same_factor():
    h = _hessian(96, 0)
    plain = inverse_cholesky(h, 0.01, "layer")
    reversed_factor = inverse_cholesky_reversed(h.flip(0, 1).clone(), 0.01, "layer")
    assert torch.equal(plain.upper, reversed_factor.upper) and plain.damp == reversed_factor.damp
    # and it is the factor: U^T U = (H + damp * mean(diag H) * I)^-1, against float64 to 1e-4 relative
    h64 = h.double() + 0.01 * torch.diag(h).double().mean() * torch.eye(96, dtype=torch.float64)
    u = plain.upper.double()
    assert torch.allclose(u.T @ u, torch.linalg.inv(h64), rtol=1e-4, atol=1e-6 * torch.linalg.inv(h64).abs().max())


def test_solve_with_the_hessian_handed_over_gives_the_same_weights():
    k, spec = 128, GridSpec(bits=4, group_size=32)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(48, k, generator=g), torch.randn(16, k, generator=g)]
    acc = HessianAccumulator(k, "cpu")
    acc.add(torch.randn(2, 64, k, generator=g) * torch.rand(k, generator=g))
    acc.hessian[:, 5] = 0  # a dead input on the way
    acc.hessian[5, :] = 0
    for act_order in ("static", "dynamic", None):
        opts = GPTQOptions(act_order=act_order or "none")
        kept = solve(weights, acc.hessian.clone(), spec, ["a", "b"], opts)
        handed = HessianAccumulator(k, "cpu")
        handed.hessian.copy_(acc.hessian)
        taken = solve(weights, handed.take(), spec, ["a", "b"], opts)
        assert handed.hessian is None
        for a, b in zip(kept, taken):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale) and torch.equal(a.g_idx, b.g_idx)


def test_disk_cache_pages_out_and_keeps_values(tmp_path):
    cache = ActivationCache("disk", torch.device("cpu"), tmp_path)
    g = torch.Generator().manual_seed(2)
    values = [torch.randn(3, 257, 33, generator=g) for _ in range(4)]
    kept = [cache.keep(v) for v in values]
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing to clean up after a crash
    cache.page_out()
    for v, k in zip(values, kept):
        assert torch.equal(v, k) and k.shape == v.shape
    del kept[0]
    cache.page_out()  # a freed tensor is dropped from the list, the others still read back
    assert all(torch.equal(v, k) for v, k in zip(values[1:], kept))


def test_peak_memory_resets_and_sees_an_allocation():
    release_free_memory()
    reset_peak_memory()
    before = peak_memory()["host_peak_mb"]
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    after = peak_memory()["host_peak_mb"]
    assert after - before > 50, (before, after)
    del big


def test_an_overflowing_inverse_is_retried_with_more_damping(monkeypatch):
    """The input is let go once factored; a non-finite inverse retries from L L^T with ten times the damping."""
    import pytest

    h = _hessian(64, 3)
    solve = torch.linalg.solve_triangular
    calls = []

    def overflow_once(*args, **kwargs):
        out = solve(*args, **kwargs)
        calls.append(1)
        return out * float("inf") if len(calls) == 1 else out

    monkeypatch.setattr(torch.linalg, "solve_triangular", overflow_once)
    with pytest.warns(UserWarning, match="succeeded with damp 0.1"):
        got = inverse_cholesky(h, 0.01, "layer")
    monkeypatch.undo()
    assert got.damp == pytest.approx(0.1) and torch.isfinite(got.upper).all()
    direct = inverse_cholesky(h, 0.1, "layer").upper
    torch.testing.assert_close(got.upper, direct, rtol=1e-4, atol=1e-5)
