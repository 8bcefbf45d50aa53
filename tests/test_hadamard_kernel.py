"""The online Hadamard (``kernels/hadamard.py``): the Triton fast Walsh-Hadamard kernel against its reference under
the interpreter (bit for bit in fp32), the reference against the dense ``x H^T / sqrt(n)`` of ``engine/orthogonal.py``'s
matrices in float64, bad widths refused on both paths."""

import pytest
import torch
from tritonq.engine.orthogonal import hadamard
from tritonq.errors import TritonqError
from tritonq.kernels import hadamard as mod
from tritonq.kernels import hadamard_transform


def _base(m):
    return None if m == 1 else hadamard(m)[0]


@pytest.mark.parametrize("n, m", [(1, 1), (2, 1), (16, 1), (64, 1), (512, 1), (2048, 1), (576, 36), (1536, 12),
                                  (24, 12), (40, 20)])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_kernel_matches_reference_bitwise(n, m, rows):
    gen = torch.Generator().manual_seed(n * 100 + rows)
    x = torch.randn(rows, n, generator=gen) * 3
    base = _base(m)
    ref = hadamard_transform(x, base, force="ref")
    tri = hadamard_transform(x, base, force="triton")
    assert ref.dtype == x.dtype and ref.shape == x.shape
    assert torch.equal(tri, ref)
    dense = hadamard(n)[0]  # the engine's own construction: base (x) Sylvester
    want = x.double() @ dense.T / n**0.5
    assert want.abs().max() > 0.5
    torch.testing.assert_close(ref.double(), want, rtol=0, atol=1e-5 * max(1.0, float(x.abs().max())))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    x = torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = hadamard_transform(x, force="ref")
    tri = hadamard_transform(x, force="triton")
    assert tri.dtype == dtype and tri.shape == x.shape
    assert torch.equal(tri, ref)
    back = hadamard_transform(ref.float(), force="ref")  # orthogonal and symmetric: applying it twice is the identity
    torch.testing.assert_close(back, x.float(), rtol=0, atol=0.05)


def test_keeps_the_norm():
    x = torch.randn(9, 1536, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = hadamard_transform(x, _base(12), force="ref")
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)  # computed in fp32
    assert (y - x).abs().max() > 0.5


@pytest.mark.parametrize("force", ["ref", "triton"])
def test_bad_widths(force):
    with pytest.raises(TritonqError, match="n = m \\* 2\\^k"):
        hadamard_transform(torch.randn(2, 96), force=force)  # 96 = 3 x 32 and no base
    with pytest.raises(TritonqError, match="n = m \\* 2\\^k"):
        hadamard_transform(torch.randn(2, 100), _base(12), force=force)
    with pytest.raises(TritonqError, match="square"):
        hadamard_transform(torch.randn(2, 64), torch.ones(2, 4), force=force)


def test_width_limit():
    with pytest.raises(TritonqError, match="up to 32768"):
        mod.hadamard_transform_triton(torch.randn(1, 1 << 16))
    assert mod.pick_config(64) in mod.CONFIGS and mod.pick_config(1 << 15) in mod.CONFIGS
