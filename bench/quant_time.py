"""``tritonq bench quant``: quantization-side kernels against their PyTorch references, side by side.

On a GPU: the Hessian kernel against the fp32 PyTorch reference (``addmm`` on fp32 copies, the way
llm-compressor/GPTQ accumulate) and the blocked GPTQ solve (in-block Triton kernel + Triton trailing
update) against the PyTorch reference solve of the same blocks, on Llama-like layer shapes, timed with
``triton.testing.do_bench`` in one run, and AWQ's scale-search loss of one linear (kernel: no candidate
weights stored; reference: candidates a few at a time, Gram form), and BoA's two-sided sweep of one q_proj
(all heads batched: row-block kernel + batched cross-row GEMM against the head-vectorized reference);
ratios are reference time / kernel time.
Without a GPU: the references on the CPU and the kernels in the interpreter on tiny shapes, checked
against each other -- a proof that the bench works, not a speed measurement, and it says so.
``--end-to-end`` adds the per-stage wall time of quantizing the default model, and BoA's quantization time
as a ratio to GPTQ's on the same model and settings, run back to back.
"""

from __future__ import annotations

import json
import time

import torch

from .. import kernels
from ..engine.grid import GridSpec
from ..engine.hessian import blocked_quantize, inverse_cholesky

GPU_SHAPES = {  # (in_features K, out_features N) of Llama-2-7B / Llama-3-8B layers
    "hessian": [(4096, 4096), (4096, 16384), (11008, 4096), (11008, 16384), (14336, 4096), (14336, 16384)],
    "gptq": [(4096, 4096), (11008, 4096), (14336, 4096)],
    # AWQ scale search of one linear (o_proj / down_proj): (K, N), 4096 cached tokens, 20 candidates
    "awq": [(4096, 4096), (11008, 4096), (14336, 4096)],
    # BoA two-sided sweep of q_proj: (heads, head_dim, K) of Llama-2-7B and Llama-3-8B (rows of 16 per launch)
    "boa": [(32, 128, 4096)],
}
CPU_SHAPES = {"hessian": [(96, 200)], "gptq": [(96, 40)], "awq": [(128, 40)], "boa": [(3, 8, 40)]}


def _timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=3, rep=20) / 1e3

    def cpu_time(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def _random_factor(k: int, device: torch.device) -> torch.Tensor:
    x = torch.randn(2 * k, k, device=device) * (0.5 + torch.rand(k, device=device))
    h = 2.0 / x.shape[0] * x.t() @ x
    return inverse_cholesky(h, 0.01, "bench").upper


def bench_hessian(device: torch.device, shapes, kernel_force: str) -> list[dict]:
    timer = _timer(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for k, tokens in shapes:
        x = torch.randn(tokens, k, device=device, dtype=dtype)
        h_ref = torch.zeros(k, k, device=device)
        h_ker = torch.zeros(k, k, device=device)
        t_ref = timer(lambda h=h_ref, x=x: kernels.hessian_accumulate(h.zero_(), x, 0, force="ref"))
        t_ker = timer(lambda h=h_ker, x=x: kernels.hessian_accumulate(h.zero_(), x, 0, force=kernel_force))
        err = float((h_ref - h_ker).abs().max() / h_ref.abs().max())
        rows.append({"op": "hessian", "K": k, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
                     "ref_s": t_ref, "kernel_s": t_ker, "speedup": t_ref / t_ker, "max_rel_diff": err})
    return rows


def bench_gptq(device: torch.device, shapes, kernel_force: str) -> list[dict]:
    timer = _timer(device)
    spec = GridSpec(bits=4, group_size=128 if device.type == "cuda" else 32)
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device=device)
        u = _random_factor(k, device)
        g_idx = (torch.arange(k, device=device) // spec.group_size).to(torch.int32)
        out = {}

        def solve(force, out=out, w=w, u=u, g_idx=g_idx):
            out[force] = blocked_quantize(w, u, spec, g_idx, 128, force=force)

        t_ref = timer(lambda: solve("ref"))
        t_ker = timer(lambda: solve(kernel_force))
        diff = float((out["ref"].weight != out[kernel_force].weight).float().mean())
        rows.append({"op": "gptq_solve", "K": k, "N": n, "ref_s": t_ref, "kernel_s": t_ker,
                     "speedup": t_ref / t_ker, "loss_ref": out["ref"].loss, "loss_kernel": out[kernel_force].loss,
                     "frac_weights_differing": diff})
    return rows


def bench_awq(device: torch.device, shapes, kernel_force: str) -> list[dict]:
    """AWQ's candidate scoring for one linear: every ratio's loss, kernel (no candidate weights stored)
    against the reference (candidates materialised a few at a time, Gram form)."""
    timer = _timer(device)
    group = 128 if device.type == "cuda" else 32
    tokens, n_cand = (4096, 20) if device.type == "cuda" else (96, 4)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for k, n in shapes:
        x = torch.randn(tokens, k, device=device) * (1 + 4 * torch.rand(k, device=device))
        w = torch.randn(n, k, device=device) * 0.02
        ratios = torch.arange(n_cand, device=device)[:, None] / n_cand
        scales = x.abs().mean(0)[None] ** ratios
        x = x.to(dtype)
        out = {}

        def run(force, out=out, w=w, x=x, scales=scales):
            out[force] = kernels.awq_scale_loss(w, x, scales, group, 15, False, force=force)

        t_ref = timer(lambda: run("ref"))
        t_ker = timer(lambda: run(kernel_force))
        diff = float(((out["ref"] - out[kernel_force]).abs() / out["ref"]).max())
        rows.append({"op": "awq_search", "K": k, "N": n, "tokens": tokens, "candidates": n_cand, "ref_s": t_ref,
                     "kernel_s": t_ker, "speedup": t_ref / t_ker, "max_rel_diff": diff,
                     "same_argmin": bool(out["ref"].argmin() == out[kernel_force].argmin())})
    return rows


def bench_boa(device: torch.device, shapes, kernel_force: str) -> list[dict]:
    """BoA's two-sided sweep of one q_proj (every head's rows in turn, cross-row compensation per row block)."""
    from ..engine.grid import fit_groups
    from ..engine.methods.boa import two_sided_sweep

    timer = _timer(device)
    rows = []
    for heads, dh, k in shapes:
        spec = GridSpec(bits=3, group_size=128 if device.type == "cuda" else 8)
        w = torch.randn(heads, dh, k, device=device)
        u_col = _random_factor(k, device)
        u_row = torch.stack([_random_factor(dh, device) for _ in range(heads)])
        s, z = fit_groups(w.reshape(heads * dh, k), spec)
        s, z = s.reshape(heads, dh, -1), z.reshape(heads, dh, -1)
        g_idx = (torch.arange(k, device=device) // spec.group_size).to(torch.int32)
        out = {}

        def solve(force, out=out, w=w, u_col=u_col, u_row=u_row, s=s, z=z, g_idx=g_idx, spec=spec):
            out[force] = two_sided_sweep(w, u_col, u_row, s, z, g_idx, spec, force=force)

        t_ref = timer(lambda: solve("ref"))
        t_ker = timer(lambda: solve(kernel_force))
        diff = float((out["ref"] - out[kernel_force]).abs().gt(1e-4).float().mean())
        rows.append({"op": "boa_sweep", "K": k, "N": heads * dh, "heads": heads, "ref_s": t_ref, "kernel_s": t_ker,
                     "speedup": t_ref / t_ker, "frac_weights_differing": diff})
    return rows


def boa_vs_gptq(device: torch.device) -> dict:
    """BoA and GPTQ quantization time on the default model, back to back, same grid and calibration."""
    import tempfile

    from ..engine.api import QuantizeOptions, quantize

    seconds = {}
    for method in ("gptq", "boa"):
        with tempfile.TemporaryDirectory() as tmp:
            summary = quantize(QuantizeOptions(output=f"{tmp}/out", model="smollm2", method=method, bits=3,
                                               group_size=64, nsamples=32, seqlen=512, device=str(device),
                                               progress=False))
        seconds[method] = round(summary.seconds["quantize_total"], 2)
    ratio = round(seconds["boa"] / seconds["gptq"], 3)
    return {"gptq_s": seconds["gptq"], "boa_s": seconds["boa"], "boa_over_gptq": ratio}


def end_to_end(device: torch.device) -> dict:
    import tempfile

    from ..engine.api import QuantizeOptions, quantize

    with tempfile.TemporaryDirectory() as tmp:
        summary = quantize(QuantizeOptions(output=f"{tmp}/out", model="smollm2", method="gptq", bits=4, group_size=64,
                                           nsamples=32, seqlen=512, device=str(device), progress=False))
    return {k: round(v, 2) for k, v in summary.seconds.items()}


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    if not on_gpu:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            print("no GPU: rerun with TRITON_INTERPRET=1 to run the kernels in the interpreter "
                  "(tiny shapes; a correctness proof, not a speed measurement)")
            return 1
    rows = bench_hessian(device, shapes["hessian"], "triton") + bench_gptq(device, shapes["gptq"], "triton")
    rows += bench_awq(device, shapes["awq"], "triton")
    rows += bench_boa(device, shapes["boa"], "triton")
    result = {"device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter: NOT a speed measurement)",
              "rows": rows}
    if getattr(args, "end_to_end", False):
        result["end_to_end_seconds"] = end_to_end(device)
        result["boa_vs_gptq"] = boa_vs_gptq(device)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"device: {result['device']}")
    for r in rows:
        shape = f"K={r['K']} " + (f"tokens={r['tokens']}" if r["op"] == "hessian" else f"N={r['N']}")
        if r["op"] == "boa_sweep":
            shape += f" ({r['heads']} heads)"
        print(f"{r['op']:<11} {shape:<22} ref {r['ref_s'] * 1e3:9.2f} ms  kernel {r['kernel_s'] * 1e3:9.2f} ms  "
              f"ratio {r['speedup']:6.2f}x")
    if "end_to_end_seconds" in result:
        print("end to end (SmolLM2, GPTQ w4 g64, 32x512 pydoc):", result["end_to_end_seconds"])
        print("BoA / GPTQ quantization time (SmolLM2, w3 g64, 32x512 pydoc, back to back):", result["boa_vs_gptq"])
    return 0
