"""AutoRound's fake quantization kernels (kernels/signround.py) in the Triton interpreter against the PyTorch
reference: the forward bit for bit (and, at V = 0 with factors 1, the min-max grid's RTN); the straight-through
backward against the float64 autograd of the reference; ragged shapes (rows not a multiple of the row tile, several
groups, per channel with a ragged last chunk, a group that is not a power of two), 2/3/4/8 bits, sym and asym;
one launch each way; bad arguments."""

import contextlib
import json
import re

import pytest
import torch
from tritonq import kernels
from tritonq.engine.grid import GridSpec, fake_quantize_groups
from tritonq.errors import TritonqError
from tritonq.kernels import signround

# (rows, K, group, bits, sym): rows never a multiple of the 32/16/8/4-row tiles; K = 1100 per channel walks two
# full 512-column chunks and a ragged one; group 48 is masked inside a 64-column chunk
CASES = [
    (37, 256, 64, 3, False), (37, 256, 64, 3, True), (21, 96, 32, 2, False), (19, 384, 128, 4, True),
    (11, 144, 48, 8, False), (13, 1100, -1, 3, False), (6, 200, -1, 4, True), (9, 128, 128, 2, True),
]


def _problem(n, k, group, seed, identity=False):
    """Fresh random weights (a constant row, an all-positive row, an all-negative row, a row of tiny weights, a
    row whose range is symmetric about 0, outliers), offsets in [-0.5, 0.5] and factors in [0.5, 1] (exactly 1
    and 0.5 included), leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    width = k if group == -1 else group
    w = torch.randn(n, k, generator=gen) * 0.05
    w[torch.rand(n, k, generator=gen) < 0.02] *= 8
    w[0] = 0.03  # constant (positive): lo = 0, the zero clamps to 0
    w[1] = w[1].abs()  # all positive: min(w_lo, 0) = 0, no gradient for min_factor
    w[2] = -w[2].abs()  # all negative: max(w_hi, 0) = 0
    w[3] = 1e-6 * torch.randn(k, generator=gen)  # a range this small clamps the scale at MIN_SCALE: no gradient
    v = torch.rand(n, k, generator=gen) - 0.5
    mf = 0.5 + 0.5 * torch.rand(n, k // width, generator=gen)
    xf = 0.5 + 0.5 * torch.rand(n, k // width, generator=gen)
    mf[-1, 0], xf[-1, 0] = 1.0, 0.5
    w[4, :2] = torch.tensor([-2.0, 2.0])  # range symmetric about 0 with equal factors: torch.maximum's tie (sym)
    mf[4] = xf[4]
    if identity:
        v.zero_(), mf.fill_(1.0), xf.fill_(1.0)
    return w, v.requires_grad_(), mf.requires_grad_(), xf.requires_grad_()


@pytest.mark.parametrize("n,k,group,bits,sym", CASES)
def test_forward_is_bit_identical_to_the_reference(n, k, group, bits, sym):
    w, v, mf, xf = _problem(n, k, group, seed=n * k + bits)
    ref = kernels.signround_qdq(w, v, mf, xf, group, 2**bits - 1, sym, force="ref")
    tri = kernels.signround_qdq(w, v, mf, xf, group, 2**bits - 1, sym, force="triton")
    assert tri.shape == (n, k) and tri.dtype == torch.float32 and tri.requires_grad
    assert torch.equal(tri, ref)
    # the offsets and factors matter: the output is not RTN's
    rtn = fake_quantize_groups(w, GridSpec(bits=bits, group_size=group, sym=sym))
    assert (tri != rtn).float().mean() > 0.05 and tri.abs().max() > 0


@pytest.mark.parametrize("n,k,group,bits,sym", CASES)
def test_no_offsets_and_unit_factors_are_the_min_max_grid(n, k, group, bits, sym):
    w, v, mf, xf = _problem(n, k, group, seed=n + k + bits, identity=True)
    rtn = fake_quantize_groups(w, GridSpec(bits=bits, group_size=group, sym=sym))
    for force in ("ref", "triton"):
        assert torch.equal(kernels.signround_qdq(w, v, mf, xf, group, 2**bits - 1, sym, force=force), rtn), force


@contextlib.contextmanager
def _rounding_replayed():
    """Record every rounding of a float32 run of the reference (the fp16 scale, each ``round``), then replay them
    in the float64 run: a float64 evaluation may round a value within 1e-7 of a midpoint the other way (the fp16
    scale's midpoints are hit in ~1e-4 of the groups), which is a different function, not a more exact gradient.
    Yields ``replay()``: call it between the two runs."""
    saved = {cls: cls.forward for cls in (signround._RoundSTE, signround._Fp16STE)}
    tapes = {cls: [] for cls in saved}
    mode = ["record"]

    def wrap(cls):
        def forward(ctx, x):  # noqa: ANN001
            if mode[0] == "record":
                tapes[cls].append(saved[cls](ctx, x))
                return tapes[cls][-1]
            out = tapes[cls].pop(0)
            return out.to(x.dtype) if cls is signround._RoundSTE else out  # _Fp16STE returns fp32 either way
        return staticmethod(forward)

    for cls in saved:
        cls.forward = wrap(cls)
    try:
        yield lambda: mode.__setitem__(0, "replay")
        assert not any(tapes.values()), "the float64 run made other roundings than the float32 run"
    finally:
        for cls, fn in saved.items():
            cls.forward = staticmethod(fn)


def _float64_grads(w, v, mf, xf, go, group, maxq, sym):
    """The oracle: autograd of the reference in float64, with the float32 run's rounding decisions."""
    with _rounding_replayed() as replay:
        signround.signround_qdq_ref(w, v.detach(), mf.detach(), xf.detach(), group, maxq, sym)
        replay()
        leaves = [t.detach().double().requires_grad_() for t in (v, mf, xf)]
        out = signround.signround_qdq_ref(w.double(), *leaves, group, maxq, sym)
        return torch.autograd.grad(out, leaves, go.double())


# The factors' gradients are sums over a group of fp32 products (<= 1100 terms here), in another order than the
# float64 oracle: 1e-5 of the largest gradient of the tensor, plus 1e-5 relative, covers the rounding with 10x
# margin (measured: <= 1e-6 of the largest). The offsets' gradient is one fp32 product: bit-exact against the
# float32 autograd, and within 1e-6 relative of float64 (the product's rounding).
GRAD_RTOL = 1e-5


@pytest.mark.parametrize("n,k,group,bits,sym", CASES)
def test_backward_matches_float64_autograd_of_the_reference(n, k, group, bits, sym):
    w, v, mf, xf = _problem(n, k, group, seed=3 * n + k + bits)
    width = k if group == -1 else group
    maxq = 2**bits - 1
    go = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    tri = torch.autograd.grad(kernels.signround_qdq(w, v, mf, xf, group, maxq, sym, force="triton"), (v, mf, xf), go)
    ref = torch.autograd.grad(kernels.signround_qdq(w, v, mf, xf, group, maxq, sym, force="ref"), (v, mf, xf), go)
    oracle = _float64_grads(w, v, mf, xf, go, width, maxq, sym)
    assert torch.equal(tri[0], ref[0])
    torch.testing.assert_close(tri[0].double(), oracle[0], rtol=1e-6, atol=0)
    for name, t, r, o in zip(("min_factor", "max_factor"), tri[1:], ref[1:], oracle[1:]):
        assert t.shape == o.shape == (n, k // width)
        atol = GRAD_RTOL * float(o.abs().max())
        torch.testing.assert_close(t.double(), o, rtol=GRAD_RTOL, atol=atol, msg=f"{name} (kernel)")
        torch.testing.assert_close(r.double(), o, rtol=GRAD_RTOL, atol=atol, msg=f"{name} (reference)")
        # gradients that can tell errors apart (sym: only the wider side of each range gets one)
        assert o.abs().max() > 1e-3 and (o != 0).float().mean() > (0.25 if sym else 0.5)
    # the rows built to hit the clamps: no min_factor gradient without negative weights, no max_factor one
    # without positive weights, none through a scale clamped at MIN_SCALE (asym: the zero's path to lo remains)
    assert tri[1][[0, 1, 3] if sym else [0, 1]].abs().max() == 0 and tri[2][[2, 3]].abs().max() == 0
    if not sym:  # the zero's clipped codes feed the factors
        assert (tri[0] == 0).any()


def test_clipped_codes_and_the_zero_path():
    """Large offsets push codes past both ends of the grid: the clamp's gradient mask (inclusive bounds) and the
    zero's gradient are exercised on every group."""
    w, v, mf, xf = _problem(17, 128, 32, seed=5)
    with torch.no_grad():
        v.mul_(40.0).clamp_(-0.5, 0.5)
    go = torch.randn(17, 128, generator=torch.Generator().manual_seed(6))
    maxq = 3
    out = kernels.signround_qdq(w, v, mf, xf, 32, maxq, False, force="triton")
    tri = torch.autograd.grad(out, (v, mf, xf), go)
    oracle = _float64_grads(w, v, mf, xf, go, 32, maxq, False)
    assert (tri[0] == 0).float().mean() > 0.05  # clipped codes: no gradient for their offsets
    assert tri[1].abs().max() > 0 and out.abs().max() > 0
    for t, o in zip(tri, oracle):
        torch.testing.assert_close(t.double(), o, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(o.abs().max()))


class _Counted:
    """A jitted kernel whose launches are counted."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_one_launch_forward_one_launch_backward(monkeypatch):
    fwd, bwd = [], []
    monkeypatch.setattr(signround, "signround_fwd_kernel", _Counted(signround.signround_fwd_kernel, fwd))
    monkeypatch.setattr(signround, "signround_bwd_kernel", _Counted(signround.signround_bwd_kernel, bwd))
    w, v, mf, xf = _problem(40, 192, 64, seed=8)
    out = kernels.signround_qdq(w, v, mf, xf, 64, 7, False, force="triton")
    assert len(fwd) == 1 and not bwd
    out.sum().backward()  # an expanded (stride 0) grad_out
    assert len(fwd) == 1 and len(bwd) == 1 and fwd[0] == bwd[0] == (3, 3)
    assert v.grad.shape == w.shape and mf.grad.shape == xf.grad.shape == (40, 3)
    kernels.signround_qdq(w, v, mf, xf, 64, 7, False)  # CPU tensors without force: the reference
    assert len(fwd) == 1


def test_strided_inputs_on_both_paths():
    w, v, mf, xf = _problem(64, 96, 32, seed=12)
    wt = w.t().contiguous().t()  # the same values, column-major
    vt = v.detach().t().contiguous().t().requires_grad_()
    outs = [kernels.signround_qdq(wt, vt, mf, xf, 32, 7, False, force=f) for f in ("ref", "triton")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], kernels.signround_qdq(w, v, mf, xf, 32, 7, False))
    grads = [torch.autograd.grad(o, vt, torch.ones_like(o))[0] for o in outs]
    assert torch.equal(grads[0], grads[1])


def test_only_requested_gradients_and_a_constant_weight():
    w, v, mf, xf = _problem(8, 64, 32, seed=9)
    mf.requires_grad_(False)
    w.requires_grad_()
    out = kernels.signround_qdq(w, v, mf, xf, 32, 15, True, force="triton")
    out.sum().backward()
    assert w.grad is None and mf.grad is None and v.grad is not None and xf.grad is not None


@pytest.mark.parametrize("change,match", [
    (lambda a: {**a, "w": a["w"][0]}, "2-D weight"),
    (lambda a: {**a, "group": 48}, "divisor of K=128"),
    (lambda a: {**a, "group": 0}, "divisor of K=128"),
    (lambda a: {**a, "maxq": 256}, "maxq"),
    (lambda a: {**a, "maxq": 0}, "maxq"),
    (lambda a: {**a, "offsets": a["offsets"].half()}, "fp32 tensors, got offsets"),
    (lambda a: {**a, "w": a["w"].double()}, "fp32 tensors, got w"),
    (lambda a: {**a, "offsets": a["offsets"][:, :64]}, "offsets of shape"),
    (lambda a: {**a, "min_factor": a["min_factor"][:, :1]}, "min_factor of shape"),
    (lambda a: {**a, "max_factor": a["max_factor"][:2]}, "max_factor of shape"),
    (lambda a: {**a, "force": "gpu"}, "force"),
])
def test_bad_arguments_raise_one_line(change, match):
    w, v, mf, xf = _problem(6, 128, 32, seed=10)
    args = change({"w": w, "offsets": v, "min_factor": mf, "max_factor": xf, "group": 32, "maxq": 7, "sym": False})
    with pytest.raises(TritonqError, match=match) as info:
        kernels.signround_qdq(**args)
    assert "\n" not in str(info.value)


def test_int32_indexing_limit():
    huge = torch.empty(2**16, 2**15, device="meta")
    with pytest.raises(TritonqError, match="int32"):
        signround._launch_args(huge, 128)
    assert signround._launch_args(torch.empty(2**16, 2**15 - 1, device="meta"), -1 + 2**15)[0] == (1, 2**14)
    with pytest.raises(TritonqError, match="rows"):
        signround._launch_args(torch.empty(65535 * 32 + 1, 8, device="meta"), 8)  # 32-row tiles at group 8


def test_config_per_group_width():
    assert [signround.pick_config(g).constexprs()["BLOCK_K"] for g in (32, 48, 64, 128, 256, 576, 14336)] == [
        32, 64, 64, 128, 256, 512, 512]
    assert signround.LIMITS.dtypes == ("fp32",)


def test_device_helpers_are_helpers_of_the_listed_kernels():
    """What the catalog's discovery skips (``DEVICE_HELPERS``) is jitted, and both kernels are in the catalog."""
    import inspect

    from tritonq.kernels.aot import catalog

    for name in signround.DEVICE_HELPERS:
        assert hasattr(getattr(signround, name), "fn"), name
        assert any(f"{name}(" in inspect.getsource(k.fn) for k in (signround.signround_fwd_kernel,
                                                                   signround.signround_bwd_kernel)), name
    listed = {(e.module, e.kernel) for e in catalog.ENTRIES}
    assert {("signround", "signround_fwd_kernel"), ("signround", "signround_bwd_kernel")} <= listed


def test_bench_runs_in_the_interpreter_and_stops_cleanly_without_it(monkeypatch, capsys):
    from tritonq.bench import signround as bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU proof, on any machine
    assert bench.main(["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "NOT a speed measurement" in result["device"] and len(result["rows"]) == len(bench.CPU_SHAPES)
    for row in result["rows"]:
        assert row["forward_equal"] and row["grad_offsets_equal"] and row["factor_grad_rel_diff"] < GRAD_RTOL
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert bench.main([]) == 1
    assert "no GPU" in capsys.readouterr().out


_PTX_SCRIPT = r"""
import json, re, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from tritonq.kernels import signround as sr
from tritonq.kernels.aot.compile import _split_signature

out = {}
for sym in (False, True):
    sig, consts = sr.aot_signature("fp32", sr.pick_config(64), SYM=sym)
    fn = sr.signround_fwd_kernel
    s, c, attrs = _split_signature(sig, consts, fn.arg_names)
    k = triton.compile(ASTSource(fn=fn, signature=s, constexprs=c, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 1, "enable_fp_fusion": True})
    out[str(sym)] = k.asm["ptx"]
json.dump(out, sys.stdout)
"""


def _contractions(ptx: str) -> list[str]:
    """fp32 instructions that round differently from the reference's separate operations: an ``fma`` other than
    ``r - 2 floor(r / 2)`` of the half-to-even rounding (exact on integers), or an add/sub/fma reading a plain
    ``mul.f32`` result (ptxas may fuse that pair into one rounding)."""
    lines = [line.strip() for line in ptx.splitlines()]
    products = {m.group(1) for line in lines if (m := re.match(r"mul\.f32\s+(%r\d+),", line))}
    bad = []
    for line in lines:
        if line.startswith("fma.rn.f32") and "0fC0000000" not in line:
            bad.append(line)
        elif re.match(r"(add|sub|fma)[.\w]*\.f32", line):
            operands = re.findall(r"%r\d+", line)[1:]
            bad += [line] if products & set(operands) else []
    return bad


@pytest.mark.slow
def test_forward_compiles_without_contractions_for_the_gpu():
    """The interpreter cannot show fma contraction; the compiled forward (sm_90, fp fusion on, as the launcher runs
    it) has none where it would change a bit, so the GPU forward is the reference's too."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for sym, ptx in json.loads(run.stdout).items():
        assert "div.rn.f32" in ptx and "cvt.rn.f16.f32" in ptx, sym  # IEEE division, fp16 scale rounding
        assert not _contractions(ptx), (sym, _contractions(ptx))


@pytest.mark.slow  # compiles the catalog's 80 builds of both kernels (cached by kernels.aot; ~1 CPU-minute cold)
def test_static_tables_report_clean_builds():
    from tritonq.bench import signround as bench

    text = bench.static_tables()
    assert text.startswith("80 builds, 0 with problems, 0 bytes spilled.")
    assert "NOT all" not in text and "4096 x 4096, g128 | signround_bwd | H100 SXM" in text
