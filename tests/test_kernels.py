"""Every quantization kernel in the Triton interpreter against its PyTorch reference, and the reference
against float64, on fresh random inputs with stated tolerances (shapes not multiples of the blocks)."""

import pytest
import torch
from tritonq import kernels
from tritonq.engine.grid import GridSpec, default_g_idx, fit_groups
from tritonq.engine.hessian import blocked_quantize, check_block_size
from tritonq.errors import TritonqError
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


@pytest.mark.parametrize("width", [257, 600])
def test_hessian_reference_tiles_match_float64(width):
    """The CPU reference forms only the tiles on and above the diagonal (uneven edges here) and mirrors them."""
    torch.manual_seed(width)
    hessian, n = torch.zeros(width, width), 0
    seen = []
    for tokens in (90, 41):
        x = torch.randn(tokens, width) * (1 + torch.rand(width))
        seen.append(x.double())
        n = kernels.hessian_accumulate(hessian, x, n, force="ref")
    xs = torch.cat(seen)
    h64 = 2.0 / xs.shape[0] * xs.t() @ xs
    scale = h64.abs().max()
    assert (hessian.double() - h64).abs().max() / scale < HESSIAN_RTOL
    # tiles off the diagonal are mirrored exactly; diagonal tiles are symmetric up to summation order
    assert (hessian - hessian.t()).abs().max() / scale < 1e-6
    edge = kernels.hessian_accum.REF_TILE // 2  # inside the first tile for both widths (2 and 3 tiles)
    assert torch.equal(hessian[:edge, width - 5:], hessian[width - 5:, :edge].t())


def test_reference_rounding_equals_torch_round_after_the_clamp():
    """The reference rounds with the fp32 magic number; after the clamp to the grid it equals torch.round."""
    torch.manual_seed(1)
    x = torch.cat([(torch.rand(20000) - 0.5) * 2.0 ** torch.randint(0, 40, (20000,)).float(),
                   torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 2.0**22 - 0.5, 1e30, -1e30, float("inf"), -float("inf")])])
    low = -torch.randint(0, 256, x.shape).float()
    high = low + 255
    magic = (x + gptq_block._ROUNDER) - gptq_block._ROUNDER
    assert torch.equal(magic.clamp(low, high), torch.round(x).clamp(low, high))


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


# ---------------------------------------------------------------- the in-kernel fit is the grid rule


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_in_kernel_fit_is_bit_exact_against_grid_rule(bits, sym):
    """With a diagonal factor no error reaches another column, so every group the kernel fits sees the
    original weights: its scales and zeros must equal ``grid_rule.minmax_scale_zero`` bit for bit."""
    from tritonq.kernels.grid_rule import MIN_SCALE, minmax_scale_zero

    gen = torch.Generator().manual_seed(100 * bits + sym)
    n, k, group, c0, ncols = 37, 160, 16, 32, 128
    # rows over eight decades (the smallest hit MIN_SCALE); some rows all-positive or all-negative
    w = torch.randn(n, k, generator=gen) * torch.logspace(-7, 1, n)[:, None]
    w[::4] = w[::4].abs()
    w[1::4] = -w[1::4].abs()
    u = torch.diag(torch.rand(k, generator=gen) + 0.5)
    g_idx = (torch.arange(k) // group).to(torch.int32)
    maxq = 2**bits - 1
    scale = torch.full((n, k // group), float("nan"))  # every group in the block must be written
    zero = torch.full_like(scale, float("nan"))
    kernels.gptq_quantize_block(w, u, c0, ncols, scale, zero, g_idx, group, maxq, sym, True, force="triton")
    blk = w[:, c0:c0 + ncols].reshape(n, ncols // group, group)
    s_ref, z_ref = minmax_scale_zero(blk.amin(dim=2), blk.amax(dim=2), maxq, sym)
    got_s, got_z = scale[:, c0 // group:(c0 + ncols) // group], zero[:, c0 // group:(c0 + ncols) // group]
    assert torch.equal(got_s, s_ref) and torch.equal(got_z, z_ref)
    assert (s_ref == MIN_SCALE).any() and (s_ref > MIN_SCALE).any()
    assert torch.isnan(scale[:, :c0 // group]).all()  # groups outside the block are left alone


# ----------------------------------------------------------------- limits, force and the error type


def test_wide_block_kernel_call_is_a_clear_error():
    n, k = 5, 512
    w, u = torch.randn(n, k), _factor(k, seed=1)
    scale, zero = torch.rand(n, 4) + 0.1, torch.randint(0, 16, (n, 4)).float()
    g_idx = (torch.arange(k) // 128).to(torch.int32)
    with pytest.raises(TritonqError, match="1 to 256 columns"):
        kernels.gptq_quantize_block(w, u, 0, 512, scale, zero, g_idx, 128, 15, False, False, force="triton")
    with pytest.raises(TritonqError, match="1 to 256 columns"):
        gptq_block.pick_config(512)
    # an in-kernel fit needs whole groups in the launch, on both paths
    for force in ("triton", "ref"):
        with pytest.raises(TritonqError, match="whole groups"):
            kernels.gptq_quantize_block(w, u, 64, 128, scale, zero, g_idx, 128, 15, False, True, force=force)
    # the reference holds any width (the engine's CPU path)
    q, _ = kernels.gptq_quantize_block(w, u, 0, 512, scale, zero, g_idx, 128, 15, False, False, force="ref")
    assert q.shape == (n, 512)


def test_force_has_one_vocabulary_and_one_error_type():
    from tritonq.kernels import dequant_matmul as dm

    assert kernels.FORCE == (None, "triton", "ref")
    x = torch.randn(4, 16)
    for bad in ("gemv", "cuda", ""):
        with pytest.raises(TritonqError, match="force must be one of"):
            kernels.use_triton(x, bad)
        with pytest.raises(TritonqError, match="force must be one of"):
            kernels.trailing_update(torch.zeros(4, 4), x, torch.zeros(16, 4), force=bad)
        with pytest.raises(TritonqError, match="force must be one of"):
            dm.dequant_matmul(x.half(), torch.zeros(2, 8, dtype=torch.int32), torch.ones(1, 8).half(), None,
                              group_size=-1, force=bad)
    with pytest.raises(TritonqError, match="kernel must be one of"):
        dm.dequant_matmul(x.half(), torch.zeros(2, 8, dtype=torch.int32), torch.ones(1, 8).half(), None,
                          group_size=-1, force="triton", kernel="gemmv")


def test_declared_limits_are_checked():
    from tritonq.kernels import dequant_matmul, hessian_accum
    from tritonq.kernels.configs import KernelLimits

    for mod in (gptq_block, hessian_accum, dequant_matmul):
        assert isinstance(mod.LIMITS, KernelLimits)
    assert gptq_block.LIMITS.max_cols == kernels.gptq_max_cols() == 256
    from tritonq.kernels.configs import check_limits

    def dequant(bits, group_size, k=None):
        check_limits("dequant_matmul", dequant_matmul.LIMITS, bits=bits, group_size=group_size, in_features=k)

    dequant(4, 128, 4096)
    dequant(4, -1, 576)
    with pytest.raises(TritonqError, match="--bits 4"):
        dequant(3, 128)
    with pytest.raises(TritonqError, match="multiples of 8"):
        dequant(4, 12)
    with pytest.raises(TritonqError, match="multiples of 8"):
        dequant(4, -1, 100)


def test_block_size_check():
    for bad in (0, -128, 1.5, True, "128"):
        with pytest.raises(TritonqError, match="--block-size"):
            check_block_size(bad)
    for good in (1, 128, 512, 4096):
        check_block_size(good)


# ------------------------------------------------------- lazy blocks wider than one kernel launch


def _gptq64(w, u, bits, group, sym):
    """GPTQ Algorithm 1 with B = 1 in float64 given the factor U; grids fitted from the up-to-date
    columns at every group start (the shared rule, on fp32 copies of them)."""
    from tritonq.kernels.grid_rule import minmax_scale_zero

    w, u = w.double().clone(), u.double()
    maxq = 2**bits - 1
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        if j % group == 0:
            cols = w[:, j:j + group].float()
            s, z = (t.double() for t in minmax_scale_zero(cols.amin(1), cols.amax(1), maxq, sym))
        q[:, j] = s * (torch.clamp(torch.round(w[:, j] / s) + z, 0, maxq) - z)
        e = (w[:, j] - q[:, j]) / u[j, j]
        w[:, j + 1:] -= e[:, None] * u[j, j + 1:][None, :]
    return q


@pytest.mark.parametrize("block_size,group,k", [(512, 128, 768), (384, 96, 768), (512, 512, 1024), (512, -1, 768)])
def test_wide_blocks_are_split_into_kernel_launches(block_size, group, k):
    """``--block-size 512`` (in-kernel fits, or per-channel grids fixed up front) and ``--group-size 512``
    (fitted on the host at the group's first launch) run as <= 256-column launches: the Triton path
    matches the reference path, and both match a float64 transcription of GPTQ (up to fp32 rounding flips
    near grid midpoints)."""
    n = 9
    gen = torch.Generator().manual_seed(block_size + group)
    w = torch.randn(n, k, generator=gen)
    u = _factor(k, seed=k + group)
    spec = GridSpec(bits=3, group_size=group)
    g_idx = default_g_idx(k, spec)
    preset = fit_groups(w, spec) if group == -1 else None
    ref = blocked_quantize(w, u, spec, g_idx, block_size, preset, force="ref")
    tri = blocked_quantize(w, u, spec, g_idx, block_size, preset, force="triton")
    # fp32 summation order differs between the paths: a rounding flip changes one code and its successors
    assert (tri.weight - ref.weight).abs().gt(1e-4).float().mean() < 0.01
    assert tri.loss == pytest.approx(ref.loss, rel=1e-3)
    oracle = _gptq64(w, u, 3, spec.effective_group(k), False)
    assert ((ref.weight.double() - oracle).abs() < 1e-4).float().mean() > 0.98
    assert ((tri.weight.double() - oracle).abs() < 1e-4).float().mean() > 0.98
    # the same problem in 128-column lazy blocks: the block width does not change GPTQ's result
    base = blocked_quantize(w, u, spec, g_idx, 128, preset, force="ref")
    assert (base.weight - ref.weight).abs().gt(1e-4).float().mean() < 0.01


# ------------------------------------------------------------------------ dependencies point down


def _engine_imports(source: str) -> list[str]:
    """Every import of ``tritonq.engine`` (absolute, or relative from inside ``tritonq.kernels``)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[:2] in (["tritonq", "engine"], ["engine"])]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")
            if node.level == 0 and mod[:2] == ["tritonq", "engine"]:
                found.append(node.module)
            elif node.level == 0 and mod == ["tritonq"] and any(a.name == "engine" for a in node.names):
                found.append("tritonq.engine")
            elif node.level >= 2 and (mod[0] == "engine" or (not node.module and any(a.name == "engine"
                                                                                      for a in node.names))):
                found.append("." * node.level + (node.module or "engine"))
    return found


def test_kernels_import_nothing_from_engine():
    from pathlib import Path

    kdir = Path(kernels.__file__).parent
    bad = {p.name: imps for p in sorted(kdir.glob("*.py")) if (imps := _engine_imports(p.read_text()))}
    assert not bad, f"kernels/ must not import the engine (move shared code below both): {bad}"


@pytest.mark.parametrize("source", [
    "from ..engine.grid import MIN_SCALE", "from .. import engine", "import tritonq.engine.grid",
    "from tritonq.engine import grid", "from tritonq import engine",
    "def f():\n    from ..engine import hessian\n",
])
def test_engine_import_check_can_fail(source):
    assert _engine_imports(source)
    assert not _engine_imports("from ..errors import TritonqError\nfrom .configs import LaunchConfig\n")
