"""The AWQ scale-search kernel (kernels/awq_search.py) in the Triton interpreter against its PyTorch
reference, and both against a float64 transcription, on fresh random inputs (shapes not multiples of the
tiles; salient input channels so that candidates differ)."""

import pytest
import torch
from tritonq import kernels
from tritonq.errors import TritonqError
from tritonq.kernels import awq_search

# The weight errors are the same fp32 operations in the same order in kernel and reference (bit-equal);
# the losses differ only by summation order over <= 200 tokens x K products: 1e-5 relative.
KERNEL_RTOL = 1e-5


def _loss64(w, x, scales, group, maxq, sym):
    """float64 loss of each candidate, from the fp32 weight error (the grid's fp32 rounding is the spec)."""
    err = awq_search.scaled_weight_error(w, scales, group, maxq, sym).double()
    x64 = x.double()
    return torch.stack([(x64 @ e.t()).pow(2).mean() for e in err])


def _case(t, k, n, a, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=gen)
    x[:, ::7] *= 10.0
    w = torch.randn(n, k, generator=gen) * 0.1
    ratios = torch.linspace(0, 0.9, a)[:, None]
    scales = (x.abs().mean(0)[None] ** ratios).float()
    return w, x.to(dtype), scales


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("t,k,n,group,a", [(70, 64, 37, 16, 3), (200, 128, 33, 64, 4), (30, 96, 5, 32, 2)])
def test_kernel_matches_reference_and_float64(sym, t, k, n, group, a):
    w, x, scales = _case(t, k, n, a, seed=t + k + n)
    maxq = 7
    ref = kernels.awq_scale_loss(w, x, scales, group, maxq, sym, force="ref")
    tri = kernels.awq_scale_loss(w, x, scales, group, maxq, sym, force="triton")
    l64 = _loss64(w, x, scales, group, maxq, sym)
    torch.testing.assert_close(tri.double(), l64, rtol=KERNEL_RTOL, atol=0)
    torch.testing.assert_close(ref.double(), l64, rtol=KERNEL_RTOL, atol=0)
    assert (l64.max() - l64.min()) / l64.min() > 1e-2  # candidates differ: the test can tell them apart


def test_reference_gram_and_token_forms_agree():
    w, x, scales = _case(300, 32, 12, 3, seed=9)  # T > K: Gram form
    gram = awq_search.awq_loss_ref(w, x, scales, 16, 15, False)
    direct = awq_search.awq_loss_ref(w, x[:20], scales, 16, 15, False)  # T < K: token form
    torch.testing.assert_close(gram.double(), _loss64(w, x, scales, 16, 15, False), rtol=1e-5, atol=0)
    torch.testing.assert_close(direct.double(), _loss64(w, x[:20], scales, 16, 15, False), rtol=1e-5, atol=0)


def test_weight_error_matches_float64_fake_quant():
    w, _x, scales = _case(10, 48, 9, 2, seed=3)
    err = awq_search.scaled_weight_error(w, scales, 16, 15, False)
    for a in range(2):
        ws = (w * scales[a]).double().reshape(9, 3, 16)
        lo, hi = ws.amin(2, keepdim=True).clamp(max=0), ws.amax(2, keepdim=True).clamp(min=0)
        sc = ((hi - lo) / 15).clamp(min=2.0**-14).to(torch.float16).double()
        z = torch.clamp(torch.round(-lo / sc), 0, 15)
        q = (sc * (torch.clamp(torch.round(ws / sc) + z, 0, 15) - z)).reshape(9, 48) / scales[a].double()
        assert (err[a].double() - (q - w.double())).abs().max() < 1e-6


def test_bf16_inputs_and_unsupported_groups():
    w, x, scales = _case(40, 64, 8, 2, seed=4, dtype=torch.bfloat16)
    tri = kernels.awq_scale_loss(w, x, scales, 32, 15, False, force="triton")
    ref = kernels.awq_scale_loss(w, x, scales, 32, 15, False, force="ref")
    torch.testing.assert_close(tri, ref, rtol=KERNEL_RTOL, atol=0)
    with pytest.raises(TritonqError, match="group sizes"):
        kernels.awq_scale_loss(w, x.float(), scales, 48, 15, False, force="triton")
    per_row = kernels.awq_scale_loss(w, x.float(), scales, -1, 15, False)  # reference on the CPU
    assert per_row.shape == (2,) and torch.isfinite(per_row).all()


def test_bench_quant_has_an_awq_row():
    from tritonq.bench import quant_time

    rows = quant_time.bench_awq(torch.device("cpu"), quant_time.CPU_SHAPES["awq"], "triton")
    assert rows and all(r["op"] == "awq_search" and r["max_rel_diff"] < 1e-5 and r["same_argmin"] for r in rows)


def test_fp16_inputs_use_a_half_precision_error():
    w, x, scales = _case(64, 64, 24, 3, seed=11, dtype=torch.float16)
    tri = kernels.awq_scale_loss(w, x, scales, 32, 15, False, force="triton")
    l64 = _loss64(w, x.float(), scales, 32, 15, False)
    # the weight error rounded to fp16 (11-bit significand): about 1e-3 relative on the loss
    torch.testing.assert_close(tri.double(), l64, rtol=5e-3, atol=0)
