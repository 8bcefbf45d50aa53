"""The AWQ search kernels in the Triton interpreter against their PyTorch references, on fresh random inputs
(token counts and row counts not multiples of the tiles, GQA-shaped q/k/v rows; salient input channels so that
candidates differ): the loss kernel (v -> o, up -> down; also against a float64 transcription), the candidates'
outputs (norm -> q/k/v, norm -> gate/up; the in-kernel grid fit bit for bit against ``grid_rule``), the clip
kernel, and the engine's batched module search (Triton path) against its per-candidate reference."""

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


# ----------------------------------------------------------------------------------------------------------
# the module searches' linear outputs (norm -> q/k/v, norm -> gate/up) and the clip search


def _rows(widths, k, seed):
    """Balance linears' rows concatenated (q/k/v under GQA: k and v narrower than q), a few large weights."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(sum(widths), k, generator=gen) * 0.1
    w[torch.rand(w.shape, generator=gen) < 0.03] *= 6
    return w


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("t,k,widths,group,a", [(37, 64, (64, 32, 32), 16, 3), (71, 96, (45, 45), 32, 2)])
def test_linear_kernel_matches_reference(sym, t, k, widths, group, a):
    """Odd token counts, N not a multiple of the 32-row tile, GQA-shaped q/k/v rows."""
    _w, x, scales = _case(t, k, 1, a, seed=t + k)
    w = _rows(widths, k, seed=t)
    ref = kernels.awq_scaled_linear(w, x, scales, group, 7, sym, force="ref")
    tri = kernels.awq_scaled_linear(w, x, scales, group, 7, sym, force="triton")
    assert tri.shape == ref.shape == (a, t, sum(widths)) and tri.dtype == torch.float32
    torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float((ref[0] - ref[-1]).abs().max()) > 1e-2 * float(ref.abs().max())  # candidates differ


@pytest.mark.parametrize("sym", [False, True])
def test_in_kernel_weights_are_bit_exact(sym):
    """One-hot tokens make the outputs the kernel's weights ``Q(W s)/s`` themselves: bit for bit the host's
    (the shared in-kernel grid fit of ``grid_fit`` against ``grid_rule``)."""
    k, group = 64, 16
    _w, _x, scales = _case(8, k, 1, 3, seed=21)
    w = _rows((40, 21), k, seed=22)
    y = kernels.awq_scaled_linear(w, torch.eye(k), scales, group, 15, sym, force="triton")
    expected = awq_search.scaled_fake_quantize(w, scales, group, 15, sym)
    assert torch.equal(y.transpose(1, 2), expected)


def test_linear_kernel_fp16_inputs():
    _w, x, scales = _case(45, 64, 1, 2, seed=23, dtype=torch.float16)
    w = _rows((33, 16), 64, seed=24)
    tri = kernels.awq_scaled_linear(w, x, scales, 32, 15, False, force="triton")
    ref = kernels.awq_scaled_linear(w, x, scales, 32, 15, False, force="ref")
    assert tri.dtype == torch.float16
    torch.testing.assert_close(tri.float(), ref.float(), rtol=2e-3, atol=2e-3 * float(ref.abs().max()))


def _gram(k, group, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, k, generator=gen)
    x[:, ::5] *= 8.0
    xg = x.reshape(300, k // group, group).transpose(0, 1)
    return (xg.transpose(1, 2) @ xg) / 300


def _clip_errors(w, gram, lo, hi, group, maxq, sym):
    """float64 ``d^T H_g d`` of the clamped, rounded groups (the fp32 grid of the reference)."""
    from tritonq.kernels import awq_clip

    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    c = torch.maximum(torch.minimum(wg, hi[..., None]), lo[..., None])
    s, z = awq_clip.minmax_scale_zero(*torch.aminmax(c, dim=2), maxq, sym)
    d = (awq_clip.fake_quantize(c.clone(), s[..., None], z[..., None], maxq) - wg).double()
    return torch.einsum("ngi,gij,ngj->ng", d, gram.double(), d)


@pytest.mark.parametrize("sym,sym_clip", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("n,k,group", [(37, 64, 16), (21, 96, 32)])
def test_clip_kernel_matches_reference(sym, sym_clip, n, k, group):
    from tritonq.engine.methods.awq_clip import shrink_factors

    w = _rows((n,), k, seed=n + k)
    gram = _gram(k, group, seed=k)
    factors = shrink_factors(20, 0.5)
    lo_r, hi_r = kernels.awq_clip_search(w, gram, factors, group, 7, sym, sym_clip, force="ref")
    lo_t, hi_t = kernels.awq_clip_search(w, gram, factors, group, 7, sym, sym_clip, force="triton")
    agree = (lo_r == lo_t) & (hi_r == hi_t)  # the factor products are the same fp32 operations
    assert agree.float().mean() > 0.97, agree.float().mean()
    err_r = _clip_errors(w, gram, lo_r, hi_r, group, 7, sym)
    err_t = _clip_errors(w, gram, lo_t, hi_t, group, 7, sym)
    assert (err_t <= err_r * (1 + 1e-4) + 1e-12).all()  # a differing pick is a near tie
    unclipped = kernels.awq_clip_search(w, gram, [1.0], group, 7, sym, sym_clip, force="ref")[1]
    assert (hi_r != unclipped).any()  # clipping chosen somewhere: the comparison can fail


def test_clip_search_dispatch():
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.methods.awq_clip import clip_search

    w = _rows((19,), 64, seed=31)
    gram = _gram(64, 16, seed=32)
    spec = GridSpec(bits=3, group_size=16)
    tri = clip_search(w, gram, spec, False, force="triton")
    ref = clip_search(w, gram, spec, False)  # the CPU: the reference
    assert ((tri[1] == ref[1]).float().mean()) > 0.97
    mse = GridSpec(bits=3, group_size=16, mse=True, max_shrink=0.8, shrink_steps=10)  # MSE grid: the reference
    assert all(torch.equal(a, b) for a, b in zip(clip_search(w, gram, mse, False, force="triton"),
                                                 clip_search(w, gram, mse, False)))
    with pytest.raises(TritonqError, match="group sizes"):
        kernels.awq_clip_search(w[:, :48], gram[:1], [1.0], 48, 7, False, False, force="triton")


# ----------------------------------------------------------------------------------------------------------
# the engine's batched module search (the Triton path) against its per-candidate reference


def _block_calls(kv_heads, seed):
    """A tiny Llama (4 heads, ``kv_heads`` KV heads) and the calls its block 0 makes to self_attn and mlp."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=kv_heads, vocab_size=101, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0]
    calls = {"self_attn": [], "mlp": []}
    hooks = [getattr(layer, name).register_forward_pre_hook(
        lambda _m, a, kw, name=name: calls[name].append((a, dict(kw))), with_kwargs=True) for name in calls]
    ids = torch.randint(0, 101, (3, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids[:2], use_cache=False)  # two calls: 2 windows, then 1 (odd token counts)
        model(input_ids=ids[2:], use_cache=False)
    for h in hooks:
        h.remove()
    return layer, calls


@pytest.mark.parametrize("part,kv_heads,sliced", [("self_attn", 2, False), ("self_attn", 4, False), ("mlp", 2, False),
                                                   ("self_attn", 2, True)])
def test_batched_module_search_matches_the_reference(part, kv_heads, sliced, monkeypatch):
    """One kernel launch per pair (one per window when the batch budget is tiny), same losses and choice."""
    from tritonq.engine.grid import GridSpec
    from tritonq.engine.methods import awq_scale

    launches = []
    launch = kernels.awq_scaled_linear
    monkeypatch.setattr(kernels, "awq_scaled_linear", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    if sliced:
        monkeypatch.setattr(awq_scale, "BATCH_ELEMENTS", 1)

    layer, calls = _block_calls(kv_heads, seed=41)
    module = getattr(layer, part)
    names = ("q_proj", "k_proj", "v_proj") if part == "self_attn" else ("gate_proj", "up_proj")
    linears = [getattr(module, n) for n in names]
    spec = GridSpec(bits=3, group_size=16)
    hidden = torch.cat([c[0][0].reshape(-1, 64) if c[0] else c[1]["hidden_states"].reshape(-1, 64)
                        for c in calls[part]])
    weights = [lin.weight.data for lin in linears]
    cands = awq_scale.candidate_scales(hidden.abs().mean(0), awq_scale.weight_mean(weights, spec),
                                       awq_scale.grid_ratios(10))
    before = [w.clone() for w in weights]
    best_r, loss_r = awq_scale.search_module_scale(module, linears, calls[part], cands, spec, part)
    best_t, loss_t = awq_scale.search_module_scale(module, linears, calls[part], cands, spec, part, force="triton")
    assert len(launches) == (3 if sliced else 1)  # 3 windows in 2 calls
    assert all(torch.equal(a, b) for a, b in zip(before, weights))  # nothing written
    assert all("forward" not in lin.__dict__ for lin in linears)  # the answering forwards are gone
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-4, atol=0)
    assert best_t == best_r
    assert (loss_r.max() - loss_r.min()) / loss_r.min() > 1e-2  # the candidates differ
